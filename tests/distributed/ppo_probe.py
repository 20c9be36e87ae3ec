"""One PPO iteration of the tiny preset with its bookkeeping recorded, in one process or under
torchrun (test_world_size.py):

    python ppo_probe.py SFT_DIR RM_DIR OUT                       # writes OUT/generation.pt
    torchrun --nproc_per_node 2 ppo_probe.py SFT_DIR RM_DIR OUT --replay ONE/generation.pt

The generation is the only part that differs with the number of processes (each rank samples
its share with its own seed), so the torchrun run replays the one-process rollouts: each rank
gets its rows of them (same widths). Each rank writes OUT/rank<r>.pt: its raw and whitened
advantages, its whitening statistics, its β, and its policy and critic weights after the update.
"""
import sys
from pathlib import Path

import torch

from minirlhf import distributed, rollout
from minirlhf.config import PRESETS, replace
from minirlhf.generate import Generation
from minirlhf.metrics import Metrics
from minirlhf.pipeline import load_inputs
from minirlhf.stages import ppo


def main(sft_dir: str, rm_dir: str, out: str, replay: str | None = None) -> None:
    out = Path(out)
    cfg = replace(PRESETS["tiny"](), ppo={"iterations": 1, "eval_every": None, "ptx_coef": 0.5})  # with PPO-ptx
    distributed.init(cfg.model)
    rec: dict = {}
    generate = ppo.generate

    def recorded_generate(model, prompts, **kw):
        if replay is None:
            gen = generate(model, prompts, **kw)
            torch.save(gen.__dict__, out / "generation.pt")
        else:  # this rank's rows of the one-process rollouts
            rows = distributed.shard_slice(cfg.ppo.batch_size)
            gen = Generation(**{k: v[rows] for k, v in torch.load(replay).items()})
            real = [p[m].tolist() for p, m in zip(gen.prompt_tokens, gen.prompt_mask)]
            assert real == prompts, "the replayed rollouts are not this rank's prompts"
        rec["mask"] = gen.mask
        return gen

    def recorded_whiten(x, lengths, shift_mean=True, *, mean=None, var=None):
        rec["advantages"] = x.clone()
        if mean is None:  # one process: the batch's own statistics
            rec["statistics"] = rollout.masked_mean_var(x, lengths)
        rec["whitened"] = whiten(x, lengths, shift_mean, mean=mean, var=var)
        return rec["whitened"]

    def recorded_statistics(x, lengths, *, all_reduce=None):
        rec["statistics"] = masked_mean_var(x, lengths, all_reduce=all_reduce)
        return rec["statistics"]

    def recorded_controller(pc):
        rec["controller"] = kl_controller(pc)
        return rec["controller"]

    def recorded_prepare(models):
        rec["models"] = models
        return prepare(models)

    whiten, masked_mean_var, kl_controller, prepare = (
        rollout.whiten, rollout.masked_mean_var, ppo.kl_controller, distributed.prepare)
    ppo.generate, rollout.whiten, rollout.masked_mean_var = recorded_generate, recorded_whiten, recorded_statistics
    ppo.kl_controller, distributed.prepare = recorded_controller, recorded_prepare
    out.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(cfg)
    ppo.run_ppo(cfg, out / "ppo", sft_dir=sft_dir, rm_dir=rm_dir, prompts=inputs.ppo_prompts, metrics=Metrics(out),
                pretrain_corpus=inputs.corpus)
    torch.save({"advantages": rec["advantages"], "whitened": rec["whitened"], "mask": rec["mask"],
                "statistics": rec["statistics"], "kl_coef": rec["controller"].value,
                **{name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                   for name, m in rec["models"].items()}},
               out / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:]
    replay = args[args.index("--replay") + 1] if "--replay" in args else None
    main(*args[:3], replay=replay)
