"""Configuration: one frozen dataclass per stage, the presets, and validation.

Every field carries a help text (shown by ``--help``) and, where it is a number or a
choice, its valid range, checked with the rest of the config before any compute. An
off-switch is ``None`` (``--ppo.reward_clip none``). The command line's view (dotted
overrides, parsing) lives in cli.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def knob(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A dataclass field with a help text for --help and its valid range.

    ge/gt/le/lt: bounds (>=, >, <=, <) of a number; choices: the allowed values. None is
    allowed for a field typed `X | None` (that is its off-switch)."""
    rng = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices))
           if v is not None}
    return field(default=default, metadata={"help": help, "range": rng})


def describe_range(rng: dict) -> str:
    """'must be ...' text of a range (for errors and --help)."""
    if "choices" in rng:
        return "one of " + ", ".join(map(str, rng["choices"]))
    lo = f"{'>=' if 'ge' in rng else '>'} {rng.get('ge', rng.get('gt'))}" if ("ge" in rng or "gt" in rng) else None
    hi = f"{'<=' if 'le' in rng else '<'} {rng.get('le', rng.get('lt'))}" if ("le" in rng or "lt" in rng) else None
    return " and ".join(x for x in (lo, hi) if x) or "any value"


def check_range(name: str, value, rng: dict, may_be_none: bool) -> None:
    """ValueError `config: name=value: must be ...` when value is outside rng."""
    if value is None:
        if may_be_none:
            return
        raise ValueError(f"config: {name}=None: must be {describe_range(rng)}")
    if "choices" in rng:
        if value not in rng["choices"]:
            raise ValueError(f"config: {name}={value!r}: must be {describe_range(rng)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        rule = describe_range(rng)
        raise ValueError(f"config: {name}={value!r}: must be " + (f"{rule} and finite" if rule != "any value" else "finite"))
    bad = (("ge" in rng and not value >= rng["ge"]) or ("gt" in rng and not value > rng["gt"])
           or ("le" in rng and not value <= rng["le"]) or ("lt" in rng and not value < rng["lt"]))
    if bad:
        raise ValueError(f"config: {name}={value!r}: must be {describe_range(rng)}")


@dataclass(frozen=True)
class TaskConfig:
    """The embedded assistant task (minirlhf/data): a small generated world of facts."""
    seed: int = knob(0, "seed of the generated world, corpus, demonstrations and prompts", ge=0, le=2**32 - 1)
    base_alignment: float = knob(0.2, "fraction of the corpus's assistant dialogues that are good ones", ge=0, le=1)
    dialogue_fraction: float = knob(0.05, "fraction of corpus documents that are assistant dialogues", ge=0, le=1)
    n_corpus_docs: int = knob(20000, "pretraining corpus documents (plain prose about the world)", ge=1)
    n_sft_demos: int = knob(2000, "SFT demonstrations written by the (imperfect) demonstrators", ge=1)
    n_rm_prompts: int = knob(2000, "prompts whose K sampled responses the annotator ranks", ge=1)
    n_ppo_prompts: int = knob(2000, "PPO training prompts", ge=1)
    n_eval_prompts: int = knob(256, "held-out evaluation prompts, disjoint from all training prompts", ge=1)
    annotator_noise: float = knob(0.5, "scale of the Gumbel (Plackett-Luce) noise in the annotator's rankings", ge=0)
    n_sft_heldout: int = knob(200, "held-out demonstrations (prompts disjoint from the SFT set) for SFT validation loss",
                              ge=1)
    n_corpus_heldout: int = knob(500, "held-out corpus documents for perplexity", ge=1)
    demo_wrong: float = knob(0.10, "fraction of demonstrations that state a wrong value", ge=0, le=1)
    demo_off_form: float = knob(0.15, "fraction of demonstrations that ignore the requested form", ge=0, le=1)
    demo_filler: float = knob(0.25, "fraction of demonstrations padded with filler ('Sure! ...', 'I hope this helps!')",
                              ge=0, le=1)


@dataclass(frozen=True)
class DataConfig:
    """Your own JSONL files instead of the embedded task (formats: README, `minirlhf data export`)."""
    corpus: str | None = knob(None, 'pretraining corpus JSONL, {"text"} per line')
    corpus_heldout: str | None = knob(None, "held-out corpus JSONL for perplexity (default: the last 5 percent of the corpus)")
    sft: str | None = knob(None, 'SFT demonstrations JSONL, {"prompt","response"} per line')
    preferences: str | None = knob(None, "preference JSONL (chosen/rejected, ranking or ratings); skips sampling + annotation")
    rm_prompts: str | None = knob(None, 'prompts JSONL ({"prompt"}) whose sampled responses the annotator ranks')
    ppo_prompts: str | None = knob(None, 'PPO training prompts JSONL, {"prompt"} per line')
    eval_prompts: str | None = knob(None, 'held-out evaluation prompts JSONL, {"prompt"} per line')


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1: next-token prediction on the corpus."""
    steps: int = knob(600, "optimizer steps", ge=1)
    batch_size: int = knob(32, "sequences per step", ge=1)
    seq_len: int = knob(128, "tokens per training sequence (windows of the packed corpus)", ge=2)
    lr: float = knob(3e-3, "peak learning rate (AdamW)", gt=0)
    min_lr_ratio: float = knob(0.1, "the cosine schedule decays to lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = knob(50, "linear warmup steps", ge=0)
    weight_decay: float = knob(0.1, "AdamW weight decay on matrices", ge=0)
    grad_clip: float | None = knob(1.0, "clip the global gradient norm to this (none: no clipping)", gt=0)
    eval_every: int = knob(100, "steps between held-out loss evaluations", ge=1)
    eval_batches: int = knob(8, "batches of held-out text per evaluation", ge=1)
    save_every: int = knob(200, "steps between resume checkpoints", ge=1)


@dataclass(frozen=True)
class SFTConfig:
    """Stage 2: supervised fine-tuning on demonstrations, loss on response tokens only."""
    epochs: int = knob(3, "passes over the demonstrations (early stopping may end sooner)", ge=1)
    samples: int | None = knob(None, "use only this many demonstrations (light SFT); none: all", ge=1)
    batch_size: int = knob(32, "demonstrations per step", ge=1)
    lr: float = knob(1e-3, "peak learning rate (AdamW)", gt=0)
    warmup_steps: int = knob(20, "linear warmup steps", ge=0)
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices", ge=0)
    grad_clip: float | None = knob(1.0, "clip the global gradient norm to this (none: no clipping)", gt=0)
    eval_every: int = knob(50, "steps between held-out loss evaluations", ge=1)
    patience: int | None = knob(3, "stop after this many evaluations without a better held-out loss (none: never)",
                                ge=1)
    save_every: int = knob(50, "steps between resume checkpoints", ge=1)


@dataclass(frozen=True)
class RMConfig:
    """Stage 3: sample K responses per prompt, annotator ranks them, train the reward model."""
    k: int = knob(4, "responses sampled and ranked per prompt", ge=2, le=9)
    temperature: float = knob(1.0, "sampling temperature of the SFT policy for comparison data", gt=0)
    max_new_tokens: int = knob(32, "longest sampled response", ge=1)
    sample_batch_size: int = knob(256, "sequences per generation batch while sampling comparisons", ge=1)
    epochs: int = knob(2, "passes over the comparisons", ge=1)
    batch_size: int = knob(16, "prompts per step (each with its K responses)", ge=1)
    lr: float = knob(5e-4, "peak learning rate (AdamW)", gt=0)
    warmup_steps: int = knob(10, "linear warmup steps", ge=0)
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices", ge=0)
    grad_clip: float | None = knob(1.0, "clip the global gradient norm to this (none: no clipping)", gt=0)
    heldout_fraction: float = knob(0.1, "fraction of comparisons held out for accuracy", ge=0, lt=1)
    save_every: int = knob(100, "steps between resume checkpoints", ge=1)


@dataclass(frozen=True)
class PPOConfig:
    """Stage 4: PPO against the frozen reward model with a per-token KL penalty to the SFT policy."""
    iterations: int = knob(40, "rollout + update iterations", ge=1)
    batch_size: int = knob(128, "prompts (rollouts) per iteration", ge=2)
    minibatch_size: int = knob(32, "rollouts per gradient step (at most ppo.batch_size)", ge=1)
    ppo_epochs: int = knob(2, "passes over each iteration's rollouts", ge=1)
    max_new_tokens: int = knob(32, "longest response", ge=1)
    temperature: float = knob(1.0, "sampling temperature (the policy's log-probs use the same)", gt=0)
    lr: float = knob(1e-4, "policy learning rate (AdamW)", gt=0)
    critic_lr: float = knob(3e-4, "critic (value model) learning rate", gt=0)
    clip_eps: float = knob(0.2, "PPO clip range of the probability ratio", gt=0, lt=1)
    value_clip: float | None = knob(0.2, "clip range of the value update (none: no value clipping)", gt=0)
    entropy_coef: float = knob(0.0, "entropy bonus coefficient", ge=0)
    gamma: float = knob(1.0, "discount of GAE", ge=0, le=1)
    lam: float = knob(0.95, "lambda of GAE", ge=0, le=1)
    kl_coef: float = knob(0.3, "initial beta of the per-token KL penalty to the reference (SFT) policy", ge=0)
    adaptive_kl: bool = knob(True, "adapt beta towards kl_target (Ziegler et al. 2019); false = fixed beta")
    kl_target: float = knob(1.5, "target KL to the reference per response (nats) of the adaptive controller", gt=0)
    kl_horizon: int = knob(10000, "horizon (in rollouts) of the adaptive KL controller", ge=1)
    truncation_penalty: float = knob(-1.0, "added to the reward of a truncated response (max_new_tokens without EOS)",
                                     le=0)
    reward_clip: float | None = knob(None, "clip the RM score to [-c, c] (none: no clipping)", gt=0)
    whiten_advantages: bool = knob(True, "normalise advantages to mean 0, std 1 over valid tokens")
    max_approx_kl: float | None = knob(0.1, "stop an iteration's PPO epochs early when approx-KL to the old policy "
                                            "exceeds this (none: never)", gt=0)
    grad_clip: float | None = knob(1.0, "clip the global gradient norm to this (none: no clipping)", gt=0)
    bookkeeping: str = knob("cpp", "rewards/GAE/whitening: cpp (the C++ rollout buffer) or torch (the readable "
                                   "definitions in stages/ppo.py); the same advantages to float rounding (whitening "
                                   "may differ in the last bit)", choices=("cpp", "torch"))
    eval_every: int | None = knob(10, "iterations between gold evaluations on held-out prompts (none: never)", ge=1)
    eval_prompts: int = knob(64, "up to this many held-out prompts (those the gold function knows) scored during "
                                 "training; all of them when there are fewer (the final eval uses all)", ge=1)
    save_every: int = knob(10, "iterations between resume checkpoints", ge=1)
    ptx_coef: float = knob(0.0, "PPO-ptx (InstructGPT eq. 2): gamma times the LM loss on pretraining-corpus windows is "
                                "added to the policy loss; 0 = off (InstructGPT used 27.8)", ge=0, le=100)
    ptx_batch_size: int = knob(8, "pretraining windows (of pretrain.seq_len tokens) per PPO minibatch when "
                                  "ptx_coef > 0", ge=1)
    monitor_window: int = knob(5, "over-optimisation monitor: iterations per window of its trends (KL growth rate, "
                                  "smoothed RM score and entropy)", ge=2)
    monitor_gold_drop: float = knob(3.0, "monitor: warn when gold falls this many standard errors below its best "
                                         "while the RM score rose", gt=0)
    monitor_entropy_ratio: float = knob(0.25, "monitor: warn when the policy's entropy falls below this fraction of "
                                              "its first iteration's", gt=0, lt=1)
    monitor_kl_accel: float = knob(2.0, "monitor: warn when KL's growth rate over the last window exceeds this "
                                        "multiple of the window before", gt=1)
    monitor_kl_growth: float = knob(0.1, "monitor: ... and exceeds this many nats per iteration", gt=0)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the held-out prompts: gold score, RM score, KL to the reference."""
    max_new_tokens: int = knob(32, "longest response", ge=1)
    temperature: float = knob(1.0, "sampling temperature (0 = greedy)", ge=0)
    batch_size: int = knob(64, "prompts per generation batch", ge=1)
    samples_shown: int = knob(6, "prompts whose responses from each stage go into the report", ge=0)


from .model import ModelConfig  # noqa: E402  (the model owns its config; the run nests it)

# The longest context a run (or `generate --max-seq-len`) may ask for: the longest of the architectures
# interop imports (Llama 3.1's max_position_embeddings). The RoPE tables are sized by it, so a larger
# value costs memory and time before any training step.
MAX_SEQ_LEN = 131072

# ModelConfig lives in model.py; its fields' ranges are kept here with the others.
MODEL_RANGES = {"vocab_size": {"ge": 8}, "dim": {"ge": 2}, "n_layers": {"ge": 1}, "n_heads": {"ge": 1},
                "n_kv_heads": {"ge": 1}, "ffn_dim": {"ge": 1}, "max_seq_len": {"ge": 4, "le": MAX_SEQ_LEN},
                "rope_theta": {"gt": 0},
                "norm_eps": {"gt": 0}, "init_std": {"gt": 0}, "head_dim": {"ge": 0},
                "rope_scaling": {"choices": ("none", "llama3")}, "rope_factor": {"gt": 0},
                "rope_low_freq_factor": {"gt": 0}, "rope_high_freq_factor": {"gt": 0}, "rope_original_max_len": {"ge": 1}}


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; saved as config.json in the run directory."""
    seed: int = knob(0, "seed of model init, sampling and data order", ge=0, le=2**32 - 1)
    device: str = knob("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    skip_sft: bool = knob(False, "use the base model as the SFT model (policy init and KL reference)")
    init_from: str | None = knob(None, "a pretrained model instead of pretraining: a Hugging Face directory or a .gguf "
                                       "file; it becomes the base (model.max_seq_len sets the run's context)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        validate(self)


SECTIONS = ("model", "task", "data", "pretrain", "sft", "rm", "ppo", "eval")


def section_class(section: str) -> type:
    return {f.name: f for f in dataclasses.fields(RunConfig)}[section].default_factory


def field_range(section: str | None, f: dataclasses.Field) -> dict:
    if section == "model":
        return MODEL_RANGES.get(f.name, {})
    return f.metadata.get("range", {})


def _optional(f: dataclasses.Field) -> bool:
    """Whether None (the off-switch) is a valid value of the field."""
    return "None" in str(f.type)


def validate(cfg: RunConfig) -> None:
    """Every field against its range, then the relations between fields; one line per mistake."""
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTIONS:
            check_range(f.name, getattr(cfg, f.name), field_range(None, f), _optional(f))
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            check_range(f"{section}.{f.name}", getattr(sub, f.name), field_range(section, f), _optional(f))
    relations = [
        ("ppo.minibatch_size", cfg.ppo.minibatch_size, cfg.ppo.minibatch_size <= cfg.ppo.batch_size,
         f"must be at most ppo.batch_size={cfg.ppo.batch_size}"),
        ("pretrain.seq_len", cfg.pretrain.seq_len, cfg.pretrain.seq_len <= cfg.model.max_seq_len,
         f"exceeds model.max_seq_len={cfg.model.max_seq_len}"),
    ]
    for section in ("rm", "ppo", "eval"):  # a prompt of one token, the response, and the EOS the RM reads
        n = getattr(cfg, section).max_new_tokens
        relations.append((f"{section}.max_new_tokens", n, n + 2 <= cfg.model.max_seq_len,
                          f"leaves no room for a prompt in model.max_seq_len={cfg.model.max_seq_len} "
                          f"(prompt + response + EOS)"))
    for f in dataclasses.fields(DataConfig):  # an unset shell variable gives "": not "use the embedded task"
        path = getattr(cfg.data, f.name)
        if path is not None and not str(path).strip():
            relations.append((f"data.{f.name}", path, False, "an empty path (leave the option out to use the "
                                                             "embedded task's data)"))
    if cfg.init_from is not None and not str(cfg.init_from).strip():
        relations.append(("init_from", cfg.init_from, False, "an empty path; give a .gguf file or a Hugging Face "
                                                             "directory (or leave it out to pretrain)"))
    for name, value, ok, why in relations:
        if not ok:
            raise ValueError(f"config: {name}={value!r}: {why}")


# ---- presets: plain instances ----

def _preset_tiny() -> RunConfig:
    """Seconds, for tests: a toy model and a toy slice of the task."""
    return RunConfig(
        model=ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=96),
        task=TaskConfig(n_corpus_docs=600, n_sft_demos=64, n_rm_prompts=24, n_ppo_prompts=32, n_eval_prompts=16),
        pretrain=PretrainConfig(steps=20, batch_size=8, seq_len=64, eval_every=10, eval_batches=2, save_every=10),
        sft=SFTConfig(epochs=1, batch_size=8, eval_every=4, save_every=4),
        rm=RMConfig(k=3, max_new_tokens=12, epochs=1, batch_size=4, save_every=2, sample_batch_size=16),
        ppo=PPOConfig(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=12,
                      eval_every=1, eval_prompts=8, save_every=1),
        eval=EvalConfig(max_new_tokens=12, batch_size=16, samples_shown=2),
    )


def _preset_quick() -> RunConfig:
    """The whole pipeline on 2 CPU cores in about 5 minutes (~1M parameters)."""
    return RunConfig()


def _preset_gpu() -> RunConfig:
    """One GPU: a ~100M-parameter model, the same recipe at scale."""
    return RunConfig(
        model=ModelConfig(vocab_size=4096, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                          max_seq_len=256, tie_embeddings=False),
        task=TaskConfig(n_corpus_docs=200000, n_sft_demos=10000, n_rm_prompts=5000, n_ppo_prompts=20000,
                        n_eval_prompts=512),
        pretrain=PretrainConfig(steps=5000, batch_size=64, seq_len=256, lr=6e-4, warmup_steps=200,
                                eval_every=500, save_every=1000),
        sft=SFTConfig(batch_size=64, lr=1e-4, eval_every=100, save_every=100),
        rm=RMConfig(batch_size=32, lr=1e-5, max_new_tokens=48, sample_batch_size=512),
        ppo=PPOConfig(iterations=200, batch_size=256, minibatch_size=64, lr=1e-5, critic_lr=1e-5,
                      max_new_tokens=48, eval_prompts=256, eval_every=20, save_every=20),
        eval=EvalConfig(max_new_tokens=48, batch_size=256),
    )


PRESETS = {"tiny": _preset_tiny, "quick": _preset_quick, "gpu": _preset_gpu}


def replace(cfg: RunConfig, **sections) -> RunConfig:
    """A new validated RunConfig with fields replaced: replace(cfg, ppo={"kl_coef": 0.05}, seed=1)."""
    top = {k: v for k, v in sections.items() if k not in SECTIONS}
    subs = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items() if s in SECTIONS}
    return dataclasses.replace(cfg, **top, **subs)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    """Inverse of to_dict (config.json); unknown keys are an error, missing keys take defaults."""
    subs = {s: section_class(s)(**d[s]) for s in SECTIONS if s in d}
    top = {k: v for k, v in d.items() if k not in SECTIONS}
    return RunConfig(**top, **subs)
