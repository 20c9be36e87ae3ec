"""Time one PPO iteration of TRL's PPO trainer on CPU; run inside a venv from make_venv.sh.

    bench/.venv-trl-1.12.0/bin/python bench/trl_ppo/trl_ppo_iteration.py --shapes JSON [--iterations 3]

The reference side of bench/'s PPO-iteration comparison (convention 5 of bench/conftest.py:
this process reports its own time per iteration, model construction excluded). It builds
four random Llama models through transformers with the shapes given (policy and reference:
LlamaForCausalLM; reward and value: LlamaForSequenceClassification with one label, as TRL's
examples do), a word-level tokenizer over the same vocabulary, and a prompt dataset of
random token ids, then runs the trainer twice from the same seed:

- "shipped": TRL as released. Its iteration calls gc.collect() twice (after the rollout
  and after the update); the time spent inside them is measured and reported.
- "gc_removed": the trainer module's `gc` replaced by one whose collect() does nothing.

TRL 1.12.0 is the newest release with `trl.experimental.ppo.PPOTrainer`; 0.11.x ships the
same trainer as `trl.PPOv2Trainer` (used when trl.experimental.ppo is absent). 0.11.4's
classic `trl.PPOTrainer` (the step(queries, responses, scores) API around one model with a
value head on the policy's trunk) is a different design -- three models, not four -- and is
not timed here.

--shapes is a JSON object (bench/conftest.py's PPO_ITERATION_SHAPES):
  vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim   the Llama config of all four models
  prompts, prompt_len, new_tokens, ppo_epochs, minibatches    one iteration's work
Prints one JSON object on stdout: per mode the seconds of each timed iteration, their
median, the gc.collect() seconds per iteration (shipped), the parameter counts, versions.
Every iteration after the first is timed (the first pays for warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import types


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", required=True, help="JSON object of the shapes (see the module docstring)")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per mode, after one warm-up")
    p.add_argument("--modes", default="shipped,gc_removed", help="comma-separated: shipped, gc_removed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shapes = json.loads(args.shapes)
    need = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "prompts", "prompt_len",
            "new_tokens", "ppo_epochs", "minibatches"}
    missing = need - set(args.shapes)
    if missing:
        p.error(f"--shapes lacks {', '.join(sorted(missing))}")
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in ("shipped", "gc_removed"):
            p.error(f"unknown mode {m!r}")
    if args.iterations < 1:
        p.error("--iterations must be >= 1")
    return args


def trainer_api():
    """(the module defining the trainer, a function building it from our objects, its config class)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as mod

        def build(config, tokenizer, policy, ref, reward, value, dataset, callbacks):
            return PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                              reward_model=reward, train_dataset=dataset, value_model=value, callbacks=callbacks)
        return mod, build, PPOConfig
    except ImportError:  # TRL 0.11.x: the same trainer, named PPOv2Trainer, older argument names
        from trl import PPOv2Config, PPOv2Trainer
        from trl.trainer import ppov2_trainer as mod

        def build(config, tokenizer, policy, ref, reward, value, dataset, callbacks):
            return PPOv2Trainer(config=config, tokenizer=tokenizer, policy=policy, ref_policy=ref,
                                reward_model=reward, train_dataset=dataset, value_model=value, callbacks=callbacks)
        return mod, build, PPOv2Config


def make_tokenizer(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_models(s, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["dim"], num_hidden_layers=s["n_layers"],
                      num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                      intermediate_size=s["ffn_dim"], max_position_embeddings=s["prompt_len"] + s["new_tokens"],
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg)
    ref = LlamaForCausalLM(cfg)
    ref.load_state_dict(policy.state_dict())  # the reference starts as the policy, as in RLHF
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
    cls_cfg = LlamaConfig(**fields, num_labels=1)
    reward = LlamaForSequenceClassification(cls_cfg)
    value = LlamaForSequenceClassification(cls_cfg)
    return policy, ref, reward, value


def run_mode(mode, args):
    import datasets
    import torch
    from transformers import TrainerCallback

    mod, build, PPOConfig = trainer_api()
    s = args.shapes
    gc_seconds = []
    real_gc = gc

    def timed_collect(*a, **k):
        t0 = time.perf_counter()
        out = real_gc.collect(*a, **k)
        gc_seconds.append(time.perf_counter() - t0)
        return out

    stand_in = types.SimpleNamespace(collect=timed_collect if mode == "shipped" else (lambda *a, **k: 0))
    original = mod.gc
    mod.gc = stand_in
    try:
        tokenizer = make_tokenizer(s["vocab_size"])
        policy, ref, reward, value = make_models(s, args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        n_iter = args.iterations + 1
        ids = torch.randint(2, s["vocab_size"], (s["prompts"] * n_iter, s["prompt_len"]), generator=g)
        dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
        marks, gc_per_iteration = [], []

        class IterationClock(TrainerCallback):
            def on_step_end(self, *a, **k):  # the trainer's step is one PPO iteration
                marks.append(time.perf_counter())
                gc_per_iteration.append(sum(gc_seconds))
                gc_seconds.clear()

        with tempfile.TemporaryDirectory() as out_dir:
            config = PPOConfig(
                output_dir=out_dir, report_to=[], use_cpu=True, seed=args.seed, bf16=False, fp16=False,
                per_device_train_batch_size=s["prompts"], gradient_accumulation_steps=1,
                num_mini_batches=s["minibatches"], num_ppo_epochs=s["ppo_epochs"], response_length=s["new_tokens"],
                local_rollout_forward_batch_size=s["prompts"], total_episodes=s["prompts"] * n_iter,
                num_sample_generations=0, stop_token="eos", temperature=1.0, kl_coef=0.05,
                learning_rate=1e-5, save_strategy="no", logging_steps=10**9, disable_tqdm=True,
            )
            trainer = build(config, tokenizer, policy, ref, reward, value, dataset, [IterationClock()])
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints tables of metrics
                trainer.train()
    finally:
        mod.gc = original
    marks = [start] + marks
    per_iter = [b - a for a, b in zip(marks, marks[1:])][1:]  # the first iteration warms up
    result = {"iteration_s": per_iter, "iteration_s_median": statistics.median(per_iter),
              "iteration_s_min": min(per_iter)}
    if mode == "shipped":
        gc_times = gc_per_iteration[1:]
        result["gc_collect_s_per_iteration"] = gc_times
        result["gc_collect_s_median"] = statistics.median(gc_times)
    return result, {name: sum(p.numel() for p in m.parameters())
                    for name, m in (("policy", policy), ("ref", ref), ("reward", reward), ("value", value))}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import transformers
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "shapes": args.shapes, "modes": {}}
    for mode in args.modes:
        out["modes"][mode], out["parameters"] = run_mode(mode, args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
