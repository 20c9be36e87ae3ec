"""Tiny Hugging Face models and tokenizers, built offline with `transformers` (the oracle) and
`tokenizers`, in the shapes of the architectures the importer supports."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

TEXT = [
    "The fox eats berries. Lima is in Peru.\nThe owl sleeps in a tree; it hunts at night.",
    "What is the capital of France? Paris is the capital of France, 2,148,000 people live there.",
    "中文也可以：狐狸吃浆果。 Emoji 🦊🍓 too, and tabs\tand  double spaces.",
    "User: Where does the fox live?\nAssistant: In a den.",
]

# chat templates in the shape of each family's own (written here, not downloaded)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{- bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% else %}{% set system = 'Be helpful.' %}{% endif %}"
          "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + strftime_now('%d %b %Y') + '\n\n'"
          " + system + '<|eot_id|>' }}"
          "{% for message in messages %}{% if message['role'] not in ['user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
          " + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer(kind: str, specials: list[str], vocab_size: int = 420) -> Tokenizer:
    """A byte-level BPE trained on TEXT, pre-tokenized like SmolLM2 ("smollm"), Llama 3
    ("llama-bpe"), Qwen2 ("qwen2") or GPT-2 ("gpt-2")."""
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif kind == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        split = _LLAMA3_SPLIT if kind == "llama-bpe" else _QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return tok


def metaspace_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace, byte fallback), as Mistral / Llama 2 tokenizer.json files are."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                                           special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                           show_progress=False))
    return tok


# name: (transformers config class, config kwargs, tokenizer builder, special tokens, template)
FAMILIES = {
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True), "smollm",
                   dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                        pad_token="<|im_end|>"), CHATML),
    "llama3-untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), "llama-bpe",
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA3),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=False), "qwen2",
                   dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), CHATML),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=4096), "metaspace",
                dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), MISTRAL),
}
_SPECIALS = {"smollm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"],
             "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}


def hf_tokenizer(family: str):
    """A transformers fast tokenizer of the family, with its chat template."""
    _, _, kind, special, template = FAMILIES[family]
    rust = metaspace_tokenizer() if kind == "metaspace" else byte_level_tokenizer(kind, _SPECIALS[kind])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, **special)
    tok.chat_template = template
    return tok


def build_hf_model(family: str, directory, seed: int = 0, **overrides):
    """save_pretrained a tiny random model (2 layers, GQA 4/2) of the family and its tokenizer into
    `directory`; returns (model in eval mode, tokenizer). The model's vocabulary is padded past
    the tokenizer's, as real checkpoints often are."""
    cls_name, extra, *_ = FAMILIES[family]
    tok = hf_tokenizer(family)
    kw = dict(vocab_size=(len(tok) // 64 + 2) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(extra)
    kw.update(overrides)
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the default init: attention far from uniform, logits far apart
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if p.dim() == 2 else 0.1)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


def to_v4_layout(directory) -> None:
    """Rewrite config.json in the transformers 4.x layout: top-level rope_theta + rope_scaling."""
    path = directory / "config.json"
    c = json.loads(path.read_text())
    rope = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    path.write_text(json.dumps(c))


def chat_ids(tok, messages) -> list[int]:
    """transformers' apply_chat_template(add_generation_prompt=True) as a list of ids (4.x returns
    the list, 5.x a BatchEncoding)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_logits(model, tokens, mask):
    """HF logits of a padded batch, positions counted over real tokens (as HF generate does)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits


def padded_batch(vocab: int, seed: int = 0):
    """Three sequences of lengths 20, 13, 6 left-padded to 20: (tokens, mask) with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :7] = False
    mask[2, :14] = False
    return tokens.masked_fill(~mask, 0), mask


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{family: (directory, HF model, HF tokenizer)}, built once per session."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        model, tok = build_hf_model(family, d)
        out[family] = (d, model, tok)
    return out
