"""A new user's reports on the command line's options, each reproduced: model-shape errors name the
field and the true reason, the context has an upper bound, eval's options match ppo's, --help says
each default once."""
import dataclasses

import pytest

from minirlhf import config as C
from minirlhf.cli import UserError, apply_overrides, build_parser, main
from minirlhf.model import ModelConfig


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# the tiny preset's model: dim=32, n_heads=2, n_kv_heads=1; each message written here by hand
@pytest.mark.parametrize("overrides,message", [
    ({"model.head_dim": "-1"}, "config: model.head_dim=-1: must be an integer >= 0 (0: dim / n_heads)"),
    ({"model.head_dim": "7"}, "config: model.head_dim=7: must be even for RoPE (it rotates pairs of channels)"),
    ({"model.dim": "34"}, "config: model.dim=34: dim / n_heads = 17 (the head width) must be even for RoPE"),
    ({"model.n_heads": "3"}, "config: model.dim=32: must be divisible by model.n_heads=3 (or give model.head_dim)"),
    ({"model.n_heads": "4", "model.n_kv_heads": "3"}, "config: model.n_heads=4: must be divisible by "
                                                      "model.n_kv_heads=3"),
    ({"model.n_layers": "0"}, "config: model.n_layers=0: must be a positive integer"),
    ({"model.rope_scaling": "yarn"}, "config: model.rope_scaling='yarn': must be one of none, llama3"),
    ({"model.rope_scaling": "llama3", "model.rope_low_freq_factor": "5"},
     "config: model.rope_low_freq_factor=5.0: must be < model.rope_high_freq_factor=4.0 with "
     "model.rope_scaling=llama3"),
    ({"model.max_seq_len": "10000000"}, "config: model.max_seq_len=10000000: must be >= 4 and <= 131072"),
])
def test_model_errors_name_the_field_its_value_and_the_reason(tmp_path, capsys, overrides, message):
    args = [a for kv in overrides.items() for a in (f"--{kv[0]}", kv[1])]
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "r"), *args]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: " + message), line
    assert not (tmp_path / "r").exists()  # refused before anything is made


def test_model_config_built_directly_says_config_model_field():
    for kwargs, start in [(dict(head_dim=-1), "config: model.head_dim=-1: must be an integer >= 0"),
                          (dict(head_dim=5), "config: model.head_dim=5: must be even"),
                          (dict(vocab_size=True), "config: model.vocab_size=True: must be a positive integer"),
                          (dict(rope_scaling="llama3", rope_factor=0.0),
                           "config: model.rope_factor=0.0: must be > 0 with model.rope_scaling=llama3")]:
        with pytest.raises(ValueError) as e:
            ModelConfig(**kwargs)
        assert str(e.value).startswith(start), str(e.value)


def test_max_seq_len_bound_keeps_llama_3_1_context():
    from minirlhf.interop.hf import model_config_from_hf

    tiny = C.PRESETS["tiny"]()
    assert apply_overrides(tiny, {"model.max_seq_len": "131072"}).model.max_seq_len == 131072
    with pytest.raises(ValueError, match=r"^config: model.max_seq_len=131073: must be >= 4 and <= 131072$"):
        apply_overrides(tiny, {"model.max_seq_len": "131073"})
    # Llama-3.1-8B's config.json (the fields we read), its own context taken as the run's
    llama31 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    shape = model_config_from_hf(llama31, None)
    assert shape.max_seq_len == 131072
    assert dataclasses.replace(tiny, model=shape).model == shape  # a run config holding it is valid
    # generate --max-seq-len has the same bound
    parse = build_parser().parse_args
    assert parse(["generate", "--init-from", "m", "--max-seq-len", "131072", "--prompt", "a"]).max_seq_len == 131072
    with pytest.raises(UserError, match="131073 must be >= 4 and <= 131072"):
        parse(["generate", "--init-from", "m", "--max-seq-len", "131073", "--prompt", "a"])


def test_help_states_the_context_bound(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.max_seq_len INT longest sequence (prompt + response) the model sees (default: 128; >= 4 " \
           "and <= 131072)" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "at most 131072" in " ".join(capsys.readouterr().out.split())


def test_ppo_eval_prompts_is_up_to_and_a_larger_request_is_noted(capsys):
    from minirlhf.pipeline import check_inputs, load_inputs
    from minirlhf.tokenizer import Tokenizer

    cfg = apply_overrides(C.PRESETS["tiny"](), {"ppo.eval_prompts": "100000"})  # accepted: "up to"
    inputs = load_inputs(cfg)
    known = sum(inputs.task.knows(p) for p in inputs.eval_prompts)
    assert known == cfg.task.n_eval_prompts == 16  # the tiny task's held-out prompts are all the task's own
    tok = Tokenizer.train(inputs.corpus[:200], vocab_size=384)
    check_inputs(cfg, inputs, tok, ("ppo",))
    err = capsys.readouterr().err
    assert ("[data] note: ppo.eval_prompts=100000 > 16 held-out prompts the gold function knows: the gold curve "
            "during PPO uses all 16") in err.splitlines()
    check_inputs(apply_overrides(cfg, {"ppo.eval_prompts": "16"}), inputs, tok, ("ppo",))
    check_inputs(apply_overrides(cfg, {"ppo.eval_every": "none"}), inputs, tok, ("ppo",))  # no curve: no note
    assert "ppo.eval_prompts" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    assert "--ppo.eval_prompts INT up to this many held-out prompts" in " ".join(capsys.readouterr().out.split())


def test_eval_takes_rm_as_ppo_does_and_rm_ckpt_still_works():
    parse = build_parser().parse_args
    assert parse(["eval", "--ckpt", "a", "--rm", "r"]).rm_ckpt == "r"
    assert parse(["eval", "--ckpt", "a", "--rm-ckpt", "r"]).rm_ckpt == "r"
    assert parse(["eval", "--ckpt", "a", "--rm", "r", "--rm.k", "3"]).__dict__["cfg:rm.k"] == "3"
    assert parse(["ppo", "--from", "s", "--rm", "r"]).rm_dir == "r"


def test_eval_has_no_resume_or_skip_sft(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--resume" not in text and "--skip-sft" not in text and "--rm RM_DIR" in text
    for option in ("--resume", "--skip-sft"):
        assert main(["eval", "--preset", "tiny", "--ckpt", "x", option]) == 2
        assert f"unrecognized arguments: {option}" in _error_line(capsys)
    with pytest.raises(SystemExit):  # the commands that train keep them
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--skip-sft" in text


def test_generate_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    start = text.index("--max-seq-len MAX_SEQ_LEN with")
    assert text[start:text.index("--prompt PROMPT", start)].count("default") == 1
    assert "samples per prompt (default: 1)" in text and "0 = greedy (default: 0.8)" in text
