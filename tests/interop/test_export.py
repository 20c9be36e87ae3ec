"""Our checkpoints → Hugging Face directories that transformers loads with the same logits / scores / ids."""
import sentencepiece as spm
import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import main as cli
from minirlhf.generate import generate
from minirlhf.interop import load_pretrained
from minirlhf.interop.export import export_model
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer, dialogue_text

from .conftest import chat_ids, hf_logits, padded_batch

transformers = pytest.importorskip("transformers")

CORPUS = ([dialogue_text("What does the fox eat?", "The fox eats berries.")] * 30
          + ["Lima is in Peru. The fox eats berries and sleeps in a den.\nThe owl hunts at night."] * 60
          + ["中文：狐狸吃浆果。 emoji 🦊🍓 numbers 12 345"] * 10)
# the test corpus of the brief: newlines, Chinese, emoji
CHECK = ["The fox eats berries.\nThe owl hunts.\n\nTwo lines.", "狐狸吃浆果，猫头鹰在夜里捕猎。", "🦊 and 🍓 and 🦉!",
         "mixed: 中文 + English + 🙂 + 123\n", "User: Where is Lima?\nAssistant: In Peru."]


def _random_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                max_seq_len=64), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
        model.scalar_head.weight.normal_(0, 0.3)
        model.scalar_head.bias.fill_(0.7)
    return model


@pytest.fixture(scope="module")
def sp():
    return Tokenizer.train(CORPUS, vocab_size=400)


def _save(path, stage, model, tok, extra=None):
    checkpoint.save(path, stage=stage, model=model, tokenizer=tok, step=1, finished=True, extra_models=extra)


@pytest.mark.parametrize("tie", [True, False])
def test_policy_export_loads_in_transformers_with_the_same_logits_and_ids(sp, tmp_path, tie):
    model = _random_model(tie_embeddings=tie)
    _save(tmp_path / "sft", "sft", model, sp)
    assert cli(["export", "--ckpt", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens, mask = padded_batch(400)
    with torch.no_grad():
        err = (model(tokens, mask) - hf_logits(hf, tokens, mask))[mask].abs().max().item()
    assert err <= 1e-5, err
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in CHECK:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    for prompt in ["What does the fox eat?", [{"role": "user", "content": "Where is Lima?"},
                                              {"role": "assistant", "content": "In Peru."},
                                              {"role": "user", "content": "中文 🦊?"}]]:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert chat_ids(hf_tok, msgs) == sp.prompt_ids(prompt)
    # greedy generation: transformers stops on the same end-of-turn token
    prompts = [sp.prompt_ids("What does the fox eat?"), sp.prompt_ids("Where is Lima?")]
    gen = generate(model, prompts, max_new_tokens=6, eos_id=sp.eos_id, pad_id=sp.pad_id, temperature=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=6, do_sample=False)
    for b in range(2):
        n = int(gen.lengths[b])
        assert gen.tokens[b, :n].tolist() == ref[b, width:width + n].tolist()


def test_reward_model_exports_as_sequence_classifier_without_the_bias(sp, tmp_path):
    model = _random_model()
    _save(tmp_path / "rm", "rm", model, sp)
    assert cli(["export", "--ckpt", str(tmp_path / "rm"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    pairs = [("What does the fox eat?", "The fox eats berries."), ("Where is Lima?", "In Peru, 中文 🦊."),
             ("Hi", "Hello there, how are you today?")]
    framed = [sp.frame(p, r)[0] for p, r in pairs]
    width = max(map(len, framed))
    tokens = torch.tensor([ids + [sp.pad_id] * (width - len(ids)) for ids in framed])  # right-padded
    mask = tokens != sp.pad_id
    last = mask.sum(1) - 1
    with torch.no_grad():
        ours = model.scalars(tokens, mask).gather(1, last[:, None]).squeeze(1)
        theirs = hf(input_ids=tokens, attention_mask=mask.long()).logits.squeeze(-1)
    assert torch.allclose(theirs, ours - 0.7, atol=1e-5), "HF score = ours minus the dropped bias"
    diffs = lambda r: r[:, None] - r[None, :]  # noqa: E731
    assert torch.allclose(diffs(theirs), diffs(ours), atol=1e-5), "pairwise preferences are unchanged"


def test_ppo_critic_exports_and_policy_is_the_default(sp, tmp_path):
    policy, critic = _random_model(), _random_model()  # (a checkpoint stores one config for both)
    with torch.no_grad():
        critic.scalar_head.weight.normal_(0, 1.0)
    _save(tmp_path / "ppo", "ppo", policy, sp, extra={"critic": critic})
    assert cli(["export", "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "critic"),
                "--model", "critic"]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic").eval()
    ids = torch.tensor([sp.frame("Where is Lima?", "In Peru.")[0]])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits[0, 0], critic.scalars(ids)[0, -1] - 0.7, atol=1e-5)
    assert cli(["export", "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "policy")]) == 0
    assert (tmp_path / "policy" / "generation_config.json").exists()
    assert cli(["export", "--ckpt", str(tmp_path / "ppo"), "--out", str(tmp_path / "x"), "--model", "value"]) == 2


def test_imported_models_round_trip(hf_dirs, tmp_path):
    """HF → ours → HF: Qwen2 (q/k/v bias) and Llama 3 (rope scaling, its own tokenizer)."""
    for family in ("qwen2-bias", "llama3-untied"):
        d, hf_model, hf_tok = hf_dirs[family]
        ours, tok = load_pretrained(d, max_seq_len=128)
        export_model(ours, tok, tmp_path / family)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        assert type(again).__name__ == type(hf_model).__name__
        tokens, mask = padded_batch(hf_model.config.vocab_size)
        assert (hf_logits(again, tokens, mask) - hf_logits(hf_model, tokens, mask))[mask].abs().max() <= 1e-5
        reread = transformers.AutoTokenizer.from_pretrained(tmp_path / family)
        msgs = [{"role": "user", "content": "Where is Lima?"}]
        assert chat_ids(reread, msgs) == chat_ids(hf_tok, msgs)


def test_export_refuses_a_tokenizer_it_cannot_reproduce(tmp_path, capsys):
    """A SentencePiece model without the dummy prefix: the conversion would encode differently."""
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=False, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, user_defined_symbols=["\n"], minloglevel=2,
                                   hard_vocab_limit=False)
    _save(tmp_path / "sft", "sft", _random_model(), Tokenizer(buf.getvalue()))
    assert cli(["export", "--ckpt", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "encodes" in err and "differently" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()
