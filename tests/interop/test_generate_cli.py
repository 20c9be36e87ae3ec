"""`generate`'s command line: prompts that are not UTF-8 or blank, a reward model's checkpoint and
--max-seq-len mistakes are one line, exit 2."""
import pytest
import torch

from minirlhf import checkpoint
from minirlhf.cli import build_parser, main as cli
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer

from .conftest import build_hf_model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(HF directory, our SentencePiece checkpoint)."""
    d = tmp_path_factory.mktemp("gen")
    build_hf_model("llama-tied", d / "hf")
    tok = Tokenizer.train(["The fox eats berries. Where is Lima? In Peru, café."] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                    max_seq_len=64))
    checkpoint.save(d / "sft", stage="sft", model=model, tokenizer=tok, step=1, finished=True)
    checkpoint.save(d / "rm", stage="rm", model=model, tokenizer=tok, step=1, finished=True)
    return d / "hf", d / "sft"


def _error(capsys, args) -> str:
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_prompt_that_is_not_utf8(sources, capsys):
    """argv bytes that are not UTF-8 (`--prompt $'caf\\xe9'`) reach Python as lone surrogates
    (PEP 383); both tokenizers would fail on them with a traceback."""
    hf, sft = sources
    capsys.readouterr()
    for source in (["--init-from", str(hf)], ["--ckpt", str(sft)]):
        err = _error(capsys, ["generate", *source, "--prompt", "fine", "--prompt", "caf\udce9", "--max-new-tokens", "2"])
        assert '--prompt "caf\\xe9": not UTF-8 text' in err, err
    assert cli(["generate", "--ckpt", str(sft), "--prompt", "café", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("value", ["0", "-5", "2", "x"])
def test_max_seq_len_out_of_range(sources, capsys, value):
    hf, _ = sources
    capsys.readouterr()
    err = _error(capsys, ["generate", "--init-from", str(hf), "--prompt", "hi", "--max-seq-len", value])
    assert "argument --max-seq-len" in err and ("must be >= 4" in err or "expected int" in err), err


def test_max_seq_len_with_a_checkpoint_is_refused(sources, capsys):
    _, sft = sources
    err = _error(capsys, ["generate", "--ckpt", str(sft), "--prompt", "hi", "--max-seq-len", "32"])
    assert "--max-seq-len goes with --init-from" in err


def test_every_generate_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


@pytest.mark.parametrize("blank, shown", [("", ""), ("   ", "   "), ("\n", "\\n"), (" \t\u3000", " \\t\\u3000")])
def test_a_blank_prompt_is_refused(sources, capsys, blank, shown):
    """As a data file refuses a blank prompt ("empty string"), with and without chat framing,
    before any model is loaded; the message stays one line whatever whitespace it was."""
    hf, sft = sources
    capsys.readouterr()
    for source in (["--init-from", str(hf)], ["--ckpt", str(sft)], ["--ckpt", str(sft), "--raw"]):
        err = _error(capsys, ["generate", *source, "--prompt", "fine", "--prompt", blank, "--max-new-tokens", "2"])
        assert f'generate: --prompt "{shown}": empty string; give a prompt with text' in err, err


def test_a_reward_models_checkpoint_is_refused_as_label_refuses_it(sources, capsys, tmp_path):
    """generate --ckpt RUN/rm sampled from a reward model (exit 0); `label` refuses it, and generate
    now says the same words; so does eval, whose --ckpt it samples from and --ref it reads
    log-probabilities of."""
    from minirlhf.label.sampling import check_checkpoint

    _, sft = sources
    rm = sft.parent / "rm"
    capsys.readouterr()
    err = _error(capsys, ["generate", "--ckpt", str(rm), "--prompt", "hi", "--max-new-tokens", "2"])
    with pytest.raises(ValueError) as label_says:
        check_checkpoint(rm)
    assert err == f"error: {label_says.value}\n"
    assert "a reward model's checkpoint (stage rm) scores responses, it does not write them; give a policy's" in err
    for args in (["--ckpt", str(rm)], ["--ckpt", str(sft), "--ref", str(rm)]):
        assert cli(["eval", "--preset", "tiny", "--out", str(tmp_path / "ev"), *args]) == 2
        assert capsys.readouterr().err.endswith(f"error: {label_says.value}\n")
