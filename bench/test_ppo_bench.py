"""Our side of "one PPO iteration vs TRL's PPO trainer" (issue 14, comparison 1).

The same shapes as bench/test_trl_ppo_bench.py (the ppo_iteration_shapes fixture,
SIZES[...]["ppo_iteration"] in bench/conftest.py; on CPU: four models of 1.31M parameters --
policy and reference from one random init, a random reward model, the critic starting as a
copy of it, as minirlhf does -- 16 prompts of 16 tokens, 32 new tokens, 4 PPO epochs over
one minibatch), β = 0.05 fixed, lr 1e-5, temperature 1, no early stop. The real stage runs
(minirlhf.stages.ppo.run_ppo, C++ bookkeeping) for `iterations` iterations; the time per
iteration is the median over the iterations after the first (the warm-up), from the metrics
the stage logs, and the per-phase split (generate / score / bookkeeping / update) is recorded
beside it (convention 5 of bench/conftest.py). Responses run to the full length (random
models almost never sample the EOS), as on TRL's side.
"""
import dataclasses
import json
import statistics

import pytest
import torch
from conftest import DEVICE, PPO_ITERATION_GROUP, measure, time_calls

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over "t2".."t{V-1}" with <pad> = 0 and <eos> = 1 (TRL's side uses the
    same vocabulary) and a chat template that writes a prompt as its words: 16 words, 16 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minirlhf.interop.hf_tokenizer import HFTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} <eos>{% endif %}"
                "{% endfor %}")
    return HFTokenizer(tok, template, {"eos_token": "<eos>", "pad_token": "<pad>"})


def update_flops(model_cfg, s: dict) -> int:
    """FLOPs of the PPO update of one iteration at the shapes s: the forward and backward of the
    policy (LM head on the response columns) and of the critic over every minibatch, in every
    epoch, as torch's FlopCounterMode counts them (matmuls and attention; the losses add no matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    from minirlhf.logprobs import response_logits, response_values
    from minirlhf.model import Transformer

    policy, critic = Transformer(model_cfg), Transformer(model_cfg)
    rows, P = s["prompts"] // s["minibatches"], s["prompt_len"]
    tokens = torch.randint(2, s["vocab_size"], (rows, P + s["new_tokens"]))
    with FlopCounterMode(display=False) as counter:
        loss = response_logits(policy, tokens, None, P).sum() + response_values(critic, tokens, None, P).sum()
        loss.backward()
    return counter.get_total_flops() * s["minibatches"] * s["ppo_epochs"]


def matmul_gflops(m: int, k: int, n: int, rounds: int = 200) -> float:
    """GFLOP/s of one fp32 (m, k) @ (k, n) matmul on this machine, fastest of `rounds` (after 20 warm-up calls)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(20):
        a @ b
    best = min(time_calls(lambda: a @ b, rounds))
    return 2 * m * k * n / best / 1e9


@pytest.mark.skipif(DEVICE != "cpu", reason="the TRL PPO comparison is measured on CPU")
def test_minirlhf_ppo_iteration(benchmark, tmp_path, ppo_iteration_shapes, ppo_iteration_model_config):
    from minirlhf import checkpoint
    from minirlhf.config import PRESETS, replace
    from minirlhf.metrics import Metrics, read_metrics
    from minirlhf.model import Transformer
    from minirlhf.stages.ppo import run_ppo

    s = ppo_iteration_shapes
    iterations = s["iterations"]  # the first is a warm-up
    tok = word_tokenizer(s["vocab_size"])
    torch.manual_seed(0)
    # one position more than TRL's models have: a truncated response is scored with the EOS appended
    # (minirlhf/reward.py); the RoPE table's length changes no parameter
    model_cfg = dataclasses.replace(ppo_iteration_model_config, max_seq_len=s["prompt_len"] + s["new_tokens"] + 1)
    for name in ("sft", "rm"):
        checkpoint.save(tmp_path / name, stage=name, model=Transformer(model_cfg), tokenizer=tok, step=0,
                        finished=True)
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"t{i}" for i in torch.randint(2, s["vocab_size"], (s["prompt_len"],), generator=g).tolist())
               for _ in range(s["prompts"] * iterations)]
    assert all(len(tok.prompt_ids(p)) == s["prompt_len"] for p in prompts)
    cfg = replace(PRESETS["tiny"](), model=dataclasses.asdict(model_cfg), pretrain=dict(seq_len=min(32, model_cfg.max_seq_len)),
                  ppo=dict(iterations=iterations, batch_size=s["prompts"], minibatch_size=s["prompts"] // s["minibatches"],
                 ppo_epochs=s["ppo_epochs"], max_new_tokens=s["new_tokens"], kl_coef=0.05, adaptive_kl=False,
                 lr=1e-5, critic_lr=1e-5, temperature=1.0, max_approx_kl=None, eval_every=None,
                 save_every=1000))

    def one_run():
        out = tmp_path / "ppo"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        (tmp_path / "metrics.jsonl").unlink(missing_ok=True)
        run_ppo(cfg, out, sft_dir=tmp_path / "sft", rm_dir=tmp_path / "rm", prompts=prompts, metrics=Metrics(tmp_path))
        return [r for r in read_metrics(tmp_path, "ppo") if "pg_loss" in r]

    rows = one_run()
    assert len(rows) == iterations and all(r["response_len"] > 0 for r in rows)
    timed = rows[1:]  # the first iteration warms up
    per_iteration = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    policy_parameters = Transformer(ppo_iteration_model_config).num_params()
    phases = {p: statistics.median(r[f"time/{p}"] for r in timed) for p in ("generate", "score", "bookkeeping",
                                                                            "update")}
    # how close the update is to the machine's matmul speed: its FLOPs per iteration (counted) over its
    # time, beside one matmul of its largest shape timed now (what "matmul-bound" in the README rests on)
    update_gflop = update_flops(model_cfg, s) / 1e9
    measure(benchmark, lambda: None, group=PPO_ITERATION_GROUP, impl="minirlhf", ours=True, memory=False,
            rounds=1, time_s=statistics.median(per_iteration), iteration_s=per_iteration,
            response_len=statistics.mean(r["response_len"] for r in timed),
            **{f"{p}_s": v for p, v in phases.items()}, shapes=json.loads(json.dumps(s)),
            update_GFLOP=update_gflop, update_GFLOPs=update_gflop / phases["update"],
            matmul_GFLOPs=matmul_gflops(s["prompts"] // s["minibatches"] * (s["prompt_len"] + s["new_tokens"]),
                                        s["dim"], s["ffn_dim"]),
            policy_parameters=policy_parameters, **{k: s[k] for k in ("prompts", "new_tokens", "ppo_epochs")})
