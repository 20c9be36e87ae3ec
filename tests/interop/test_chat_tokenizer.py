"""HFTokenizer: tokenizer.json + the model's chat template, framing identical to transformers."""
import json

import pytest
import torch

from minirlhf.interop.hf_tokenizer import HFTokenizer
from minirlhf.tokenizer import Tokenizer, load_tokenizer

from .conftest import FAMILIES, TEXT, chat_ids

transformers = pytest.importorskip("transformers")

END_OF_TURN = {"llama-tied": "<|im_end|>", "llama3-untied": "<|eot_id|>", "qwen2-bias": "<|im_end|>",
               "mistral": "</s>"}
CONVERSATIONS = [
    "What does the fox eat?",
    [{"role": "user", "content": "Where is Lima?"}, {"role": "assistant", "content": "In Peru."},
     {"role": "user", "content": "And the fox?\n中文 🦊"}],
]
SYSTEM = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]


def _messages(p):
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_equal_apply_chat_template(hf_dirs, family):
    d, _, hf_tok = hf_dirs[family]
    tok = HFTokenizer.load(d)
    convs = CONVERSATIONS + ([SYSTEM] if family != "mistral" else [])  # Mistral's template has no system role
    for conv in convs:
        assert tok.prompt_ids(conv) == chat_ids(hf_tok, _messages(conv))


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_masks_exactly_the_assistant_tokens(hf_dirs, family):
    d, _, hf_tok = hf_dirs[family]
    tok = HFTokenizer.load(d)
    eot = hf_tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert tok.eos_id == eot
    for conv in CONVERSATIONS:
        response = "The fox eats berries 🍓.\nThat is all."
        ids, mask = tok.frame(conv, response)
        prompt = chat_ids(hf_tok, _messages(conv))
        expected = prompt + hf_tok(response, add_special_tokens=False)["input_ids"] + [eot]
        assert ids == expected
        assert mask == [0] * len(prompt) + [1] * (len(expected) - len(prompt))
        assert tok.decode(ids[len(prompt):]) == response


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_equal_transformers(hf_dirs, family):
    d, _, hf_tok = hf_dirs[family]
    tok = HFTokenizer.load(d)
    assert tok.vocab_size == len(hf_tok)
    for text in TEXT + ["", " leading", "trailing \n", "12345 67"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.encode_batch(TEXT) == [tok.encode(t) for t in TEXT]
    ids = tok.encode(TEXT[0])
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    # decoding stops at the end-of-turn token and drops special tokens
    tail = tok.encode(" junk")
    assert tok.decode(torch.tensor(ids + [tok.eos_id] + tail)) == tok.decode(ids)


def test_special_ids_of_each_family(hf_dirs):
    d, _, hf_tok = hf_dirs["llama3-untied"]
    tok = HFTokenizer.load(d)
    assert tok.bos_id == hf_tok.convert_tokens_to_ids("<|begin_of_text|>")
    d, _, hf_tok = hf_dirs["qwen2-bias"]
    tok = HFTokenizer.load(d)
    assert tok.bos_id is None and tok.pad_id == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.document("a b") == tok.encode("a b") + [tok.doc_eos_id]


def test_bos_added_by_the_post_processor_starts_documents(hf_dirs, tmp_path):
    from tokenizers import processors

    d, _, hf_tok = hf_dirs["mistral"]
    rust = hf_tok.backend_tokenizer if hasattr(hf_tok, "backend_tokenizer") else hf_tok._tokenizer
    rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", rust.token_to_id("<s>"))])
    rust.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer.load(tmp_path)
    assert tok.add_bos and tok.document("fox") == [tok.bos_id] + tok.encode("fox") + [tok.eos_id]
    assert tok.encode("fox")[0] != tok.bos_id


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_and_transformers_reads_it(hf_dirs, family, tmp_path):
    d, _, hf_tok = hf_dirs[family]
    tok = HFTokenizer.load(d)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer)
    assert (again.eos_id, again.pad_id, again.bos_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    for conv in CONVERSATIONS:
        assert again.prompt_ids(conv) == tok.prompt_ids(conv)
    reread = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conv in CONVERSATIONS:
        assert chat_ids(reread, _messages(conv)) == tok.prompt_ids(conv)


def test_chat_template_from_tokenizer_config_and_without_any(hf_dirs, tmp_path):
    d, _, hf_tok = hf_dirs["llama-tied"]
    tok = HFTokenizer.load(d)
    tok.save(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert HFTokenizer.load(tmp_path).prompt_ids("hi") == tok.prompt_ids("hi")
    # a model without a template gets our plain "User: ...\nAssistant:" format
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    plain = HFTokenizer.load(tmp_path)
    assert plain.render("hi") == "<|im_start|>User: hi\nAssistant:"
    assert plain.eos_id == plain.doc_eos_id


def test_template_errors_are_one_line_value_errors(hf_dirs):
    d, *_ = hf_dirs["mistral"]
    tok = HFTokenizer.load(d)
    with pytest.raises(ValueError, match="roles must alternate") as e:
        tok.prompt_ids(SYSTEM)  # the template itself raises: Mistral has no system role
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="last message must be a user turn"):
        tok.prompt_ids([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_load_tokenizer_detects_the_kind(hf_dirs, tmp_path):
    sp = Tokenizer.train(TEXT * 10, vocab_size=400)
    (tmp_path / "sp").mkdir()
    sp.save(tmp_path / "sp")
    assert isinstance(load_tokenizer(tmp_path / "sp"), Tokenizer)
    assert isinstance(load_tokenizer(hf_dirs["mistral"][0]), HFTokenizer)
    with pytest.raises(ValueError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
