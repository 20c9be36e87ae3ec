"""Our checkpoints → Hugging Face directories that transformers loads with the same logits / scores / ids."""
import json

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


def _one_line_error(capsys, *expect):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for s in expect:
        assert s in err, (s, err)


def _tree(d):
    return sorted((str(p.relative_to(d)), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


def test_export_never_deletes_what_is_not_an_earlier_export(sp, tmp_path, capsys):
    """--out may be new, empty or an earlier export; the checkpoint, its run, a directory of
    other files or a file are refused in one line with nothing changed."""
    run = tmp_path / "runs" / "cp"
    _save(run / "ppo", "ppo", _random_model(), sp)
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "afile").write_text("a file")
    before = _tree(tmp_path)
    for out, message in [(run / "ppo", "is or holds the checkpoint"), (run, "is or holds the checkpoint"),
                         (tmp_path, "is or holds the checkpoint"), (run / "ppo" / "hf", "inside the checkpoint"),
                         (run / "notes", "a directory of other files"), (tmp_path / "afile", "exists and is not a directory")]:
        assert cli(["export", "--ckpt", str(run / "ppo"), "--out", str(out)]) == 2, out
        _one_line_error(capsys, f"--out {out}: {message}")
        assert _tree(tmp_path) == before, out
    # a run directory for --ckpt: the message names the checkpoints inside it
    assert cli(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 2
    _one_line_error(capsys, f"{run}: a run directory, not a stage's checkpoint; its stages: {run / 'ppo'}")
    assert cli(["export", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 2
    _one_line_error(capsys, "nowhere: no checkpoint here")
    assert _tree(tmp_path) == before


def test_an_earlier_export_is_replaced_whole(sp, tmp_path, capsys, monkeypatch):
    first, second = _random_model(), _random_model(tie_embeddings=False)
    with torch.no_grad():
        second.embed.weight.mul_(2)
    _save(tmp_path / "a", "sft", first, sp)
    _save(tmp_path / "b", "sft", second, sp)
    _save(tmp_path / "rm", "rm", first, sp)
    (tmp_path / "empty").mkdir()
    assert cli(["export", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "empty")]) == 0
    # a causal LM's export, replaced by a classifier's (no generation_config.json), then a causal LM's again
    assert cli(["export", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "generation_config.json").exists()
    assert cli(["export", "--ckpt", str(tmp_path / "rm"), "--out", str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "generation_config.json").exists(), "replaced whole, not written over"
    marker = json.loads((tmp_path / "hf" / "minirlhf_export.json").read_text())
    assert marker["files"] == sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert cli(["export", "--ckpt", str(tmp_path / "b"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf.model.embed_tokens.weight, second.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "empty", "hf", "rm"], \
        "no temporary directories left"
    # an export that fails (a tokenizer it cannot reproduce) leaves the earlier one as it was
    before = _tree(tmp_path / "hf")
    bad = Tokenizer(sp.model_proto)
    bad.encode = lambda text: [5] + sp.encode(text)
    with pytest.raises(ValueError, match="encodes"):
        export_model(first, bad, tmp_path / "hf")
    assert _tree(tmp_path / "hf") == before
    # so does one that fails half-written (a full disk), leaving no temporary directory behind
    import minirlhf.interop.export as export_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export_module, "save_file", disk_full)
    with pytest.raises(OSError):
        export_model(first, sp, tmp_path / "hf")
    assert _tree(tmp_path / "hf") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "empty", "hf", "rm"]


def test_export_never_deletes_what_it_did_not_write(sp, tmp_path, capsys):
    """The tester's case: an export nested inside an export, and a file of the user's in an
    export, were deleted by the next export into it. Each is refused in one line naming it,
    exit 2, with nothing written; so is an --out inside an earlier export."""
    _save(tmp_path / "A" / "ppo", "ppo", _random_model(), sp)
    _save(tmp_path / "A" / "sft", "sft", _random_model(tie_embeddings=False), sp)
    hf = tmp_path / "hf"
    assert cli(["export", "--ckpt", str(tmp_path / "A" / "ppo"), "--out", str(hf)]) == 0
    capsys.readouterr()
    before = _tree(tmp_path)
    for out in (hf / "sub", hf / "sub" / "deeper"):
        assert cli(["export", "--ckpt", str(tmp_path / "A" / "ppo"), "--out", str(out)]) == 2
        _one_line_error(capsys, f"--out {out}: inside the earlier export {hf.resolve()} (an export is replaced whole)")
        assert _tree(tmp_path) == before
    # what a user adds to an export: a file, a directory (an export made elsewhere and moved in), a link
    additions = [("README_mine.md", lambda p: p.write_text("notes")), ("sub", lambda p: p.mkdir()),
                 ("a_link", lambda p: p.symlink_to(hf / "config.json")),
                 ("tokenizer.model", lambda p: p.write_text("a name export writes elsewhere, not here"))]
    for name, add in additions:
        add(hf / name)
        before = _tree(tmp_path)
        assert cli(["export", "--ckpt", str(tmp_path / "A" / "sft"), "--out", str(hf)]) == 2
        _one_line_error(capsys, f"--out {hf}: an earlier export that also holds {name}, which export did not write")
        assert _tree(tmp_path) == before, name
        (hf / name).rmdir() if (hf / name).is_dir() and not (hf / name).is_symlink() else (hf / name).unlink()
    # an export made before the marker listed its files: only the names an export writes are its own
    marker = json.loads((hf / "minirlhf_export.json").read_text())
    del marker["files"]
    (hf / "minirlhf_export.json").write_text(json.dumps(marker))
    (hf / "README_mine.md").write_text("notes")
    assert cli(["export", "--ckpt", str(tmp_path / "A" / "sft"), "--out", str(hf)]) == 2
    _one_line_error(capsys, "also holds README_mine.md")
    (hf / "README_mine.md").unlink()
    assert cli(["export", "--ckpt", str(tmp_path / "A" / "sft"), "--out", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is False  # sft's (untied), not ppo's
    # a file of the user's that appears while the export is being written: refused at the swap
    import minirlhf.interop.export as export_module

    real = export_module.save_file

    def and_a_user_file(*args, **kwargs):
        real(*args, **kwargs)
        (hf / "late.txt").write_text("written meanwhile")
    export_module.save_file = and_a_user_file
    try:
        with pytest.raises(ValueError, match="also holds late.txt"):
            export_model(_random_model(), sp, hf)
    finally:
        export_module.save_file = real
    assert (hf / "late.txt").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "hf"], "no temporary directory left"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=lambda m: f"umask{m:03o}")
def test_export_has_the_usual_permissions(sp, tmp_path, mask):
    """tempfile.mkdtemp makes 0700 and safetensors 0600: the export is 0777 / 0666 less the umask."""
    import os
    import stat

    _save(tmp_path / "sft", "sft", _random_model(), sp)
    old = os.umask(mask)
    try:
        assert cli(["export", "--ckpt", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~mask
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors" in written and "minirlhf_export.json" in written
    for p in (tmp_path / "hf").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_a_model_is_exported_only_in_its_own_role(sp, tmp_path, capsys):
    """A reward model or the critic as a causal LM, or a policy as a sequence classifier, would be a
    meaningless model loaded without complaint: refused in one line naming the stage / model and
    what to use instead, before anything is written."""
    policy, critic = _random_model(), _random_model()
    _save(tmp_path / "rm", "rm", policy, sp)
    _save(tmp_path / "ppo", "ppo", policy, sp, extra={"critic": critic})
    _save(tmp_path / "sft", "sft", policy, sp)
    out = tmp_path / "hf"
    cases = [
        (["--ckpt", str(tmp_path / "rm"), "--head", "causal-lm"],
         f"{tmp_path / 'rm'}: a reward model's checkpoint (stage rm) scores responses, it does not write them; "
         "export it with --head sequence-classification (its default), or give a policy's (a stage such as "
         "runs/quick/sft or runs/quick/ppo)"),
        (["--ckpt", str(tmp_path / "ppo"), "--model", "critic", "--head", "causal-lm"],
         f"{tmp_path / 'ppo'}: --model critic: PPO's value model scores responses, it does not write them; "
         "export it with --head sequence-classification (its default), or give the policy (--model model)"),
        (["--ckpt", str(tmp_path / "sft"), "--head", "sequence-classification"],
         f"{tmp_path / 'sft'}: a policy's checkpoint (stage sft) writes responses, it does not score them"),
        (["--ckpt", str(tmp_path / "ppo"), "--head", "sequence-classification"],
         "a policy's checkpoint (stage ppo) writes responses"),
    ]
    for args, message in cases:
        assert cli(["export", *args, "--out", str(out)]) == 2, args
        _one_line_error(capsys, message)
        assert not out.exists()
    # each in its own role, the default head
    for args in (["--ckpt", str(tmp_path / "rm")], ["--ckpt", str(tmp_path / "ppo"), "--model", "critic"],
                 ["--ckpt", str(tmp_path / "sft")]):
        assert cli(["export", *args, "--out", str(out)]) == 0, args


def test_exported_reward_model_scores_padded_batches_in_transformers(hf_dirs, tmp_path):
    """An imported ChatML model pads with its end-of-turn token <|im_end|>: the exported
    classifier's pad_token_id and the exported tokenizer's pad token are one other token, so
    transformers' last-non-pad-token read lands on <|im_end|> with either padding side, and
    the documented framing (export.py's docstring, the README) gives our score minus the bias."""
    d, _, _ = hf_dirs["llama-tied"]
    model, tok = load_pretrained(d, max_seq_len=64)
    assert tok.pad_id == tok.eos_id  # the case that went wrong
    torch.manual_seed(0)
    with torch.no_grad():
        model.scalar_head.weight.normal_(0, 1.0)
        model.scalar_head.bias.fill_(0.7)
    _save(tmp_path / "rm", "rm", model, tok)
    assert cli(["export", "--ckpt", str(tmp_path / "rm"), "--out", str(tmp_path / "hf")]) == 0
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert rm.config.pad_token_id == hf_tok.pad_token_id != rm.config.eos_token_id == tok.eos_id
    marker = json.loads((tmp_path / "hf" / "minirlhf_export.json").read_text())
    assert marker["score_bias"] == pytest.approx(0.7) and marker["head"] == "sequence-classification"

    pairs = [([{"role": "user", "content": "What does the fox eat?"}], "The fox eats berries."),
             ([{"role": "user", "content": "Where is Lima?"}], "In Peru, 中文 🦊."),
             ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Hello there, how are you?")]

    def framed(messages, response):  # as the README writes it
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (hf_tok(prompt, add_special_tokens=False)["input_ids"]
                + hf_tok(response, add_special_tokens=False)["input_ids"] + [rm.config.eos_token_id])

    ids = [framed(m, r) for m, r in pairs]
    assert ids == [tok.frame(m, r)[0] for m, r in pairs]
    ours = torch.stack([model.scalars(torch.tensor([x]))[0, -1] for x in ids]).detach()
    assert hf_tok.padding_side == "right"
    for side in ("right", "left"):
        hf_tok.padding_side = side
        batch = hf_tok.pad({"input_ids": ids}, return_tensors="pt")
        if side == "left":  # positions counted from each sequence's first token, as the README says
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            theirs = rm(**batch).logits[:, 0]
        assert torch.allclose(theirs, ours - 0.7, atol=1e-5), (side, (theirs - ours + 0.7).abs().max())


def test_export_writes_the_imported_models_own_context(hf_dirs, tmp_path):
    """A model imported with a shorter run context (max_seq_len 32) exports its own
    max_position_embeddings (128), through a checkpoint's save and load; our own models
    export their max_seq_len; a sliding window shorter than the context bounds it."""
    d, _, _ = hf_dirs["llama-tied"]
    model, tok = load_pretrained(d, max_seq_len=32)
    _save(tmp_path / "sft", "sft", model, tok)
    assert checkpoint.load_tokenizer(tmp_path / "sft").context_len == 128
    assert cli(["export", "--ckpt", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 128
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 128

    from .conftest import build_hf_model
    build_hf_model("mistral", tmp_path / "mistral", sliding_window=64)
    model, tok = load_pretrained(tmp_path / "mistral", max_seq_len=32)
    out = export_model(model, tok, tmp_path / "mistral-hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 64
