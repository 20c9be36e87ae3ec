"""Configuration: one frozen dataclass per stage, presets, CLI overrides, validation.

Every field carries a help text (shown by ``--help``) and can be overridden from the
command line as ``--<section>.<field> VALUE`` (``--ppo.kl_coef 0.05``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def knob(default, help: str):
    """A dataclass field with a help text for --help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TaskConfig:
    """The embedded assistant task (minirlhf/data): a small generated world of facts."""
    seed: int = knob(0, "seed of the generated world, corpus, demonstrations and prompts")
    base_alignment: float = knob(0.2, "fraction of the corpus's assistant dialogues that are good ones")
    dialogue_fraction: float = knob(0.05, "fraction of corpus documents that are assistant dialogues")
    n_corpus_docs: int = knob(20000, "pretraining corpus documents (plain prose about the world)")
    n_sft_demos: int = knob(2000, "SFT demonstrations written by the (imperfect) demonstrators")
    n_rm_prompts: int = knob(2000, "prompts whose K sampled responses the annotator ranks")
    n_ppo_prompts: int = knob(2000, "PPO training prompts")
    n_eval_prompts: int = knob(256, "held-out evaluation prompts, disjoint from all training prompts")
    annotator_noise: float = knob(0.5, "scale of the Gumbel (Plackett-Luce) noise in the annotator's rankings")
    n_sft_heldout: int = knob(200, "held-out demonstrations (prompts disjoint from the SFT set) for SFT validation loss")
    n_corpus_heldout: int = knob(500, "held-out corpus documents for perplexity")
    demo_wrong: float = knob(0.10, "fraction of demonstrations that state a wrong value")
    demo_off_form: float = knob(0.15, "fraction of demonstrations that ignore the requested form")
    demo_filler: float = knob(0.25, "fraction of demonstrations padded with filler ('Sure! ...', 'I hope this helps!')")


@dataclass(frozen=True)
class DataConfig:
    """Your own JSONL files instead of the embedded task (formats: README, `minirlhf data export`)."""
    corpus: str | None = knob(None, 'pretraining corpus JSONL, {"text"} per line')
    corpus_heldout: str | None = knob(None, "held-out corpus JSONL for perplexity (default: a slice of the corpus)")
    sft: str | None = knob(None, 'SFT demonstrations JSONL, {"prompt","response"} per line')
    preferences: str | None = knob(None, "preference JSONL (chosen/rejected, ranking or ratings); skips sampling + annotation")
    rm_prompts: str | None = knob(None, 'prompts JSONL ({"prompt"}) whose sampled responses the annotator ranks')
    ppo_prompts: str | None = knob(None, 'PPO training prompts JSONL, {"prompt"} per line')
    eval_prompts: str | None = knob(None, 'held-out evaluation prompts JSONL, {"prompt"} per line')


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1: next-token prediction on the corpus."""
    steps: int = knob(600, "optimizer steps")
    batch_size: int = knob(32, "sequences per step")
    seq_len: int = knob(128, "tokens per training sequence (windows of the packed corpus)")
    lr: float = knob(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = knob(0.1, "the cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = knob(50, "linear warmup steps")
    weight_decay: float = knob(0.1, "AdamW weight decay on matrices")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this")
    eval_every: int = knob(100, "steps between held-out loss evaluations")
    eval_batches: int = knob(8, "batches of held-out text per evaluation")
    save_every: int = knob(200, "steps between resume checkpoints")


@dataclass(frozen=True)
class SFTConfig:
    """Stage 2: supervised fine-tuning on demonstrations, loss on response tokens only."""
    epochs: int = knob(3, "passes over the demonstrations (early stopping may end sooner)")
    samples: int | None = knob(None, "use only this many demonstrations (light SFT); default all")
    batch_size: int = knob(32, "demonstrations per step")
    lr: float = knob(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = knob(20, "linear warmup steps")
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this")
    eval_every: int = knob(50, "steps between held-out loss evaluations")
    patience: int = knob(3, "stop after this many evaluations without a better held-out loss")


@dataclass(frozen=True)
class RMConfig:
    """Stage 3: sample K responses per prompt, annotator ranks them, train the reward model."""
    k: int = knob(4, "responses sampled and ranked per prompt (2..9)")
    temperature: float = knob(1.0, "sampling temperature of the SFT policy for comparison data")
    max_new_tokens: int = knob(32, "longest sampled response")
    epochs: int = knob(2, "passes over the comparisons")
    batch_size: int = knob(16, "prompts per step (each with its K responses)")
    lr: float = knob(5e-4, "peak learning rate (AdamW)")
    warmup_steps: int = knob(10, "linear warmup steps")
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this")
    heldout_fraction: float = knob(0.1, "fraction of comparisons held out for accuracy")


@dataclass(frozen=True)
class PPOConfig:
    """Stage 4: PPO against the frozen reward model with a per-token KL penalty to the SFT policy."""
    iterations: int = knob(40, "rollout + update iterations")
    batch_size: int = knob(128, "prompts (rollouts) per iteration")
    minibatch_size: int = knob(32, "rollouts per gradient step")
    ppo_epochs: int = knob(2, "passes over each iteration's rollouts")
    max_new_tokens: int = knob(32, "longest response")
    temperature: float = knob(1.0, "sampling temperature (the policy's log-probs use the same)")
    lr: float = knob(1e-4, "policy learning rate (AdamW)")
    critic_lr: float = knob(3e-4, "critic (value model) learning rate")
    clip_eps: float = knob(0.2, "PPO clip range of the probability ratio")
    value_clip: float = knob(0.2, "clip range of the value update (0 disables value clipping)")
    entropy_coef: float = knob(0.0, "entropy bonus coefficient")
    gamma: float = knob(1.0, "discount of GAE")
    lam: float = knob(0.95, "lambda of GAE")
    kl_coef: float = knob(0.3, "initial beta of the per-token KL penalty to the reference (SFT) policy")
    adaptive_kl: bool = knob(True, "adapt beta towards kl_target (Ziegler et al. 2019); false = fixed beta")
    kl_target: float = knob(1.5, "target KL to the reference per response (nats) of the adaptive controller")
    kl_horizon: int = knob(10000, "horizon (in rollouts) of the adaptive KL controller")
    no_eos_penalty: float = knob(-1.0, "added to the reward of a response that hits max_new_tokens without EOS")
    reward_clip: float = knob(0.0, "clip the RM score to [-c, c] (0 disables)")
    whiten_advantages: bool = knob(True, "normalise advantages to mean 0, std 1 over valid tokens")
    max_approx_kl: float = knob(0.1, "stop an iteration's PPO epochs early when approx-KL to old exceeds this")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this")
    eval_every: int = knob(10, "iterations between gold evaluations on the held-out prompts")
    eval_prompts: int = knob(64, "held-out prompts scored during training (the final eval uses all)")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the held-out prompts: gold score, RM score, KL to the reference."""
    max_new_tokens: int = knob(32, "longest response")
    temperature: float = knob(1.0, "sampling temperature")
    batch_size: int = knob(64, "prompts per generation batch")
    samples_shown: int = knob(6, "prompts whose responses from each stage go into the report")


from .model import ModelConfig  # noqa: E402  (the model owns its config; the run nests it)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; saved as config.json in the run directory."""
    seed: int = knob(0, "seed of model init, sampling and data order")
    device: str = knob("auto", "auto | cpu | cuda")
    skip_sft: bool = knob(False, "use the base model as the SFT model (policy init and KL reference)")
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


def _fail(name: str, value, why: str):
    raise ValueError(f"config: {name}={value!r}: {why}")


def validate(cfg: RunConfig) -> None:
    """Range checks that a dataclass type cannot express; one clear line per mistake."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", cfg.device, "must be auto, cpu or cuda")
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 and f.name not in (
                    "no_eos_penalty",):
                _fail(f"{section}.{f.name}", v, "must not be negative")
    if not 2 <= cfg.rm.k <= 9:
        _fail("rm.k", cfg.rm.k, "must be in 2..9")
    for name, v in (("ppo.gamma", cfg.ppo.gamma), ("ppo.lam", cfg.ppo.lam),
                    ("task.base_alignment", cfg.task.base_alignment), ("rm.heldout_fraction", cfg.rm.heldout_fraction)):
        if not 0.0 <= v <= 1.0:
            _fail(name, v, "must be in [0, 1]")
    if not 0.0 < cfg.ppo.clip_eps < 1.0:
        _fail("ppo.clip_eps", cfg.ppo.clip_eps, "must be in (0, 1)")
    if cfg.ppo.minibatch_size > cfg.ppo.batch_size or cfg.ppo.minibatch_size == 0:
        _fail("ppo.minibatch_size", cfg.ppo.minibatch_size, f"must be in 1..ppo.batch_size={cfg.ppo.batch_size}")
    for section in ("pretrain", "sft", "rm", "ppo"):
        if getattr(cfg, section).lr <= 0:
            _fail(f"{section}.lr", getattr(cfg, section).lr, "must be positive")
    if cfg.pretrain.seq_len > cfg.model.max_seq_len:
        _fail("pretrain.seq_len", cfg.pretrain.seq_len, f"exceeds model.max_seq_len={cfg.model.max_seq_len}")


# ---- presets: plain instances ----

def _preset_tiny() -> RunConfig:
    """Seconds, for tests: a toy model and a toy slice of the task."""
    return RunConfig(
        model=ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=96),
        task=TaskConfig(n_corpus_docs=600, n_sft_demos=64, n_rm_prompts=24, n_ppo_prompts=32, n_eval_prompts=16),
        pretrain=PretrainConfig(steps=20, batch_size=8, seq_len=64, eval_every=10, eval_batches=2, save_every=10),
        sft=SFTConfig(epochs=1, batch_size=8, eval_every=4),
        rm=RMConfig(k=3, max_new_tokens=12, epochs=1, batch_size=4),
        ppo=PPOConfig(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=12,
                      eval_every=1, eval_prompts=8),
        eval=EvalConfig(max_new_tokens=12, batch_size=16, samples_shown=2),
    )


def _preset_quick() -> RunConfig:
    """The whole pipeline on 2 CPU cores in about 15 minutes (~1M parameters)."""
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
        sft=SFTConfig(batch_size=64, lr=1e-4, eval_every=100),
        rm=RMConfig(batch_size=32, lr=1e-5, max_new_tokens=48),
        ppo=PPOConfig(iterations=200, batch_size=256, minibatch_size=64, lr=1e-5, critic_lr=1e-5,
                      max_new_tokens=48, eval_prompts=256, eval_every=20),
        eval=EvalConfig(max_new_tokens=48, batch_size=256),
    )


PRESETS = {"tiny": _preset_tiny, "quick": _preset_quick, "gpu": _preset_gpu}


# ---- the command line's view: dotted overrides, help, JSON ----

def _field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" | None", "").replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "bool": bool, "str": str}[t]


def _parse(text: str, f: dataclasses.Field, name: str):
    kind = _field_type(f)
    if text.lower() in ("none", "null") and f.default is None:
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {kind.__name__}, got {text!r}") from None


def fields_of(section: str):
    cls = {f.name: f for f in dataclasses.fields(RunConfig)}[section].default_factory
    return dataclasses.fields(cls)


def apply_overrides(cfg: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """overrides: {"ppo.kl_coef": "0.05", "seed": "1"} → a new validated RunConfig."""
    top, nested = {}, {}
    top_fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS}
    for name, text in overrides.items():
        if "." in name:
            section, key = name.split(".", 1)
            if section not in SECTIONS:
                raise ValueError(f"--{name}: unknown section {section!r} (one of {', '.join(SECTIONS)})")
            fs = {f.name: f for f in fields_of(section)}
            if key not in fs:
                raise ValueError(f"--{name}: {section} has no field {key!r} (see --help)")
            nested.setdefault(section, {})[key] = _parse(text, fs[key], name)
        elif name in top_fields:
            top[name] = _parse(text, top_fields[name], name)
        else:
            raise ValueError(f"--{name}: unknown option (see --help)")
    subs = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in nested.items()}
    return dataclasses.replace(cfg, **top, **subs)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    """Inverse of to_dict (config.json); unknown keys are an error, missing keys take defaults."""
    subs = {}
    for section in SECTIONS:
        if section in d:
            cls = {f.name: f for f in dataclasses.fields(RunConfig)}[section].default_factory
            subs[section] = cls(**d[section])
    top = {k: v for k, v in d.items() if k not in SECTIONS}
    return RunConfig(**top, **subs)
