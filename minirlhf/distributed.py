"""Many devices: every stage under `torchrun`, on PyTorch's own engine (torch.distributed).

    torchrun --nproc_per_node N -m minirlhf train ...            one machine, N processes
    torchrun --nnodes 2 --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
             --rdzv-id RUN -m minirlhf train ...                  the same line on each machine

Without torchrun (or with one process) nothing here touches torch.distributed: every
function is the identity or a no-op, and a run is exactly what it is in one process.

With N ranks (NCCL for CUDA tensors, gloo for CPU ones), a stage cuts every *global*
batch — the same on every rank, drawn from the same seeded order — into N contiguous
shares (`shard`), so the global batch size, the learning-rate schedule and the results do
not depend on N. The trained models are wrapped once, in `loop.open_stage` (`prepare`):

  ddp    a whole copy per device; DistributedDataParallel averages the gradients
  fsdp   FSDP2 (`fully_shard`, each block and the root): parameters, gradients and AdamW
         moments sharded over the ranks. Sampling and scoring, which step the ranks
         unevenly, run on the whole weights (`gathered`); frozen models (the PPO
         reference and reward model, evaluation) are whole on every rank.

The few quantities that must be global are reduced where a stage uses them, in plain view:
a mean's share (`share`: DDP/FSDP average gradients, so each rank scales its part of a
global mean), sums for the logged means and the held-out losses (`all_sum`), PPO's
whitening statistics (`all_reduce`, through rollout.masked_mean_var) and mean KL for the
adaptive controller (`mean_of`), lists of evaluated responses and rankings (`gather`).
Files are written once, by rank 0: checkpoints (whole models and plain optimizer states,
gathered from FSDP shards: a checkpoint resumes with any number of processes), the
rankings, metrics, the report, an experiment's bookkeeping (`on_main`: rank 0 reads and writes
the shared files, every rank gets its answer). The run directory must be visible to every rank
(one machine, or a shared filesystem across machines).

Output: ranks other than 0 print nothing (their stdout and stderr go to /dev/null); an error
is printed by the rank that hit it first (`report_failure`, a key in the process group's
store), the others end quietly. A collective waits at most `--dist.timeout` seconds, so a
rank that dies never leaves the others hanging.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp")
STRATEGY_HELP = ("how N processes hold the trained models: ddp = a whole copy per device, gradients averaged "
                 "(DistributedDataParallel); fsdp = parameters, gradients and AdamW state sharded over the devices "
                 "(FSDP2 fully_shard), the whole weights gathered for sampling; auto (the default) = DDP when the "
                 "PPO stage (policy and critic with AdamW, reference and reward model: about 40 bytes per "
                 "parameter) fits in half of one device's memory, FSDP2 otherwise. Ignored in one process")
BYTES_PER_PARAM = 2 * 16 + 2 * 4  # PPO: two trained fp32 models (weights, grads, 2 AdamW moments), two frozen
ERROR_KEY = "minirlhf/first_error"


@dataclass(frozen=True)
class Options:
    """How a run uses several processes (the `--dist.*` options; results do not depend on them
    beyond float rounding)."""
    strategy: str = "auto"
    timeout_s: float = 600.0
    threads: int = 0


@dataclass
class _World:
    size: int = 1
    rank: int = 0
    strategy: str = "ddp"
    device: torch.device = torch.device("cpu")
    threads: int = 0       # --dist.threads
    stderr: object = None  # the real stderr of a silenced rank


_world = _World()


# ---------------------------------------------------------------- who am I
def active() -> bool:
    """True when this process is one of several (torchrun with WORLD_SIZE > 1, initialised)."""
    return _world.size > 1


def size() -> int:
    return _world.size


def rank() -> int:
    return _world.rank


def is_main() -> bool:
    """Rank 0 (the process that writes files and prints); before init, from torchrun's RANK."""
    if dist.is_available() and dist.is_initialized():
        return _world.rank == 0
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether torchrun (or another env:// launcher) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpu_threads(requested: int = 0, env=None, cores: int | None = None) -> int:
    """Torch CPU threads for this process.

    requested > 0 wins (`--dist.threads`). In one process: OMP_NUM_THREADS if set, else every
    core (as always). Under torchrun: the cores this process may use divided by the processes
    on this node (LOCAL_WORLD_SIZE), at least 1 — N processes with all cores each oversubscribe
    the machine (two 2-thread trainings on 2 cores ran 10x slower than one). OMP_NUM_THREADS
    counts as the user's choice there too, except a 1 next to several local processes: that is
    what torchrun sets when nobody did (pass --dist.threads 1 to force one thread)."""
    env = os.environ if env is None else env
    if requested > 0:
        return requested
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    omp = env.get("OMP_NUM_THREADS")
    if local <= 1 and int(env.get("WORLD_SIZE", "1")) <= 1:
        return int(omp or 0) or os.cpu_count() or 1
    if omp and (omp != "1" or local <= 1):
        return int(omp)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local, 1))


def fits_one_device(n_params: int, device: torch.device, local_world: int = 1) -> bool:
    """Whether the PPO stage's models (BYTES_PER_PARAM per parameter) fit in half of one device's
    memory: a CUDA device's, or this node's RAM shared by its local processes."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world, 1)
    return n_params * BYTES_PER_PARAM <= memory // 2


# ---------------------------------------------------------------- start and end
def init(model_cfg=None, device: torch.device | None = None, options: Options | None = None) -> None:
    """Join the process group when torchrun started several processes; idempotent; nothing in one process.

    NCCL for CUDA tensors and gloo for CPU ones (small reductions and objects travel over
    gloo), each collective bounded by options.timeout_s; the CUDA device is this process's
    LOCAL_RANK. Resolves the strategy (model_cfg: the run's ModelConfig, for `auto`) and
    silences the output of every rank but 0. options: the --dist.* options (None: keep those given
    by an earlier call, e.g. the CLI's)."""
    if options is not None:
        _world.threads = options.threads
    if active() or not launched():
        return
    options = options or Options(threads=_world.threads)
    if options.strategy not in STRATEGIES:
        raise ValueError(f"--dist.strategy {options.strategy}: must be one of {', '.join(STRATEGIES)}")
    device = torch.device("cpu") if device is None else device
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=options.timeout_s))
    strategy = options.strategy
    if strategy == "auto":
        strategy = "ddp"
        if model_cfg is not None:
            from .model import Transformer
            with torch.device("meta"):
                n = Transformer(model_cfg).num_params()
            strategy = "ddp" if fits_one_device(n, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) else "fsdp"
    _world.size, _world.rank, _world.strategy, _world.device = dist.get_world_size(), dist.get_rank(), strategy, device
    if _world.rank != 0:  # progress bars, logs and notes: rank 0's only
        _world.stderr = sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")
    from .device import use_all_cores
    use_all_cores()
    print(f"[dist] {_world.size} processes ({dist.get_backend()}), strategy {strategy}, "
          f"{torch.get_num_threads()} CPU threads each")


def shutdown() -> None:
    """Leave the process group after a successful run (all ranks reach this together)."""
    if active() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _world.size, _world.rank = 1, 0


def strategy() -> str:
    return _world.strategy


def threads_option() -> int:
    return _world.threads


# ---------------------------------------------------------------- failures
def report_failure(line: str) -> None:
    """Print a one-line error, once for the whole run: by the first rank that records it in the
    process group's store (the others stay quiet: their failure follows from it, or repeats it).
    In one process, or before the group exists under torchrun (then on local rank 0 only: every
    rank fails the same way on a bad option), simply printed."""
    if not active():
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(line, file=sys.stderr)
        return
    tagged = line.replace("error: ", f"error: [rank {rank()}] ", 1) if line.startswith("error: ") else line
    if _claim(tagged):
        print(tagged, file=_world.stderr or sys.stderr)


def _claim(message: str) -> bool:
    """Record message as the run's first failure; False when another rank's is already there."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))
        return store.compare_set(ERROR_KEY, "", message).decode() == message
    except Exception:  # noqa: BLE001 — the store went down with the rank that served it: speak for ourselves
        return True


def end_on_error(e: BaseException) -> int | None:
    """An unexpected exception on one of several ranks: the exit code to end with quietly (another
    rank failed first, or a collective lost its peers: said in one line), or None to re-raise it
    (this rank failed first with a bug: its traceback is printed). One process: None."""
    if not active():
        return None
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, (dist.DistError, TimeoutError)) or any(
            s in first for s in ("gloo", "NCCL", "Connection", "Timed out", "timed out", "closed")):
        why = re.sub(r"^\[[^\]]*\] ", "", first).split(". ")[0][:200]  # without gloo's source location
        report_failure(f"error: lost contact with the other processes ({why}); every process stops, the last "
                       f"checkpoint is kept — rerun with --resume")
        return 1
    if not _claim(f"[rank {rank()}] {type(e).__name__}: {first}"):
        return 1
    if _world.stderr is not None:  # the traceback of a bug must be seen
        sys.stderr = _world.stderr
    return None


# ---------------------------------------------------------------- sharding and reductions
def shard_slice(n: int) -> slice:
    """This rank's contiguous share of n items: [rank·n // N, (rank + 1)·n // N)."""
    return slice(rank() * n // size(), (rank() + 1) * n // size())


def shard(batch):
    """(share, weight): this rank's contiguous share of a global batch (a list or a tensor's rows)
    and 1.0; a rank left without rows (batch smaller than N) gets the first row and weight 0.0,
    since every rank must still run forward and backward for DDP/FSDP to average gradients."""
    share = batch[shard_slice(len(batch))]
    return (share, 1.0) if len(share) else (batch[:1], 0.0)


def share(mean: torch.Tensor, n: float, total: float) -> torch.Tensor:
    """This rank's part of a mean over a global batch of `total` items: `mean` (over this rank's n
    items) · n · N / total. DDP and FSDP2 average the ranks' gradients, so the update is the
    gradient of the mean over the whole batch, as in one process. One process: mean itself."""
    if not active():
        return mean
    return mean * (float(n) * size() / float(total))


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum t over the ranks, in place (torch.distributed.all_reduce; CPU tensors travel over gloo)."""
    if active():
        dist.all_reduce(t)
    return t


def all_sum(*values):
    """Each value (a number or a one-element tensor) summed over the ranks, as floats, in one
    all-reduce (float64). One process: the values as they are."""
    if not active():
        return values if len(values) > 1 else values[0]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    out = t.tolist()
    return out if len(out) > 1 else out[0]


def mean_of(x: torch.Tensor) -> float:
    """The mean of x's elements over every rank's x (each holds its rows of the batch)."""
    if not active():
        return x.mean().item()
    total, n = all_sum(x.double().sum(), x.numel())
    return total / n


def average(values: dict) -> dict:
    """Each number averaged over the ranks (rank-local diagnostics), in one all-reduce."""
    if not active() or not values:
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / size()).tolist()))


def average_value(value):
    """One number (or one-element tensor) averaged over the ranks; one process: value as it is."""
    return average({"v": value})["v"] if active() else value


def maximum(value: float) -> float:
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (all_gather_object). One process: items."""
    if not active():
        return items
    parts = [None] * size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def same_everywhere(name: str, value: dict) -> None:
    """ValueError (one line, naming the first differing entry) unless every rank was given the same
    `value`: several launches (nodes) must run one configuration."""
    if not active():
        return
    everyone = [None] * size()
    dist.all_gather_object(everyone, value)
    for r, other in enumerate(everyone):
        if other != value:
            key = next((k for k in sorted(set(value) | set(other)) if value.get(k) != other.get(k)), "?")
            raise ValueError(f"{name}: rank {r} was started with {key}={other.get(key)!r}, rank {rank()} with "
                             f"{value.get(key)!r}; every process (every node's launch) must get the same options")


def barrier() -> None:
    if active():
        dist.barrier()


def rank_seed(seed: int) -> int:
    """A sampling seed of its own for each rank (rank 0 keeps `seed`): ranks that share a prompt
    must not draw the same response."""
    return seed + rank() * 2 ** 40


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) run by rank 0 alone, its result sent to every rank (broadcast_object_list):
    bookkeeping that reads and writes shared files (rank 0 writes them once; the others, which wait
    here at most --dist.timeout, then see them on disk and get the same answer). An Exception raised
    by fn on rank 0 is raised on every rank (a copy; a ValueError stays a ValueError, so every rank
    ends as rank 0 does). One process: fn(*args, **kwargs)."""
    if not active():
        return fn(*args, **kwargs)
    box, error = [None], None
    if is_main():
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 — every rank must hear of it, or the others would wait
            error = e
            box[0] = (False, _portable(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise value
    return value


def _portable(e: Exception) -> Exception:
    """e itself when it pickles (to travel to the other ranks), else a RuntimeError with its line."""
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it writes a shared file, e.g. the tokenizer), then the others
    (which find the file)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------- the trained models
class _Methods(nn.Module):
    """The model's forward and scalars as one forward(method=...), so DDP sees both."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, method: str = "forward", **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class Replicated:
    """A DDP-replicated model as a stage trains through it: view(tokens, attn) and
    view.scalars(tokens, attn) run through DistributedDataParallel (its gradients are averaged
    over the ranks in backward); everything else uses the plain model, whose parameters DDP shares."""

    def __init__(self, model: nn.Module, device: torch.device):
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # the only buffers (RoPE tables) are constants: no broadcast before every forward
        quiet = "forward_sync_buffers" in inspect.signature(DDP).parameters
        buffers = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
        # static_graph: the same parameters go unused in every step (the policy never touches the
        # scalar head, the critic the LM head), which DDP learns in the first step
        self.ddp = DDP(_Methods(model), device_ids=[device.index] if device.type == "cuda" else None,
                       static_graph=True, **buffers)
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, method="forward", **kwargs)

    def scalars(self, *args, **kwargs):
        return self.ddp(*args, method="scalars", **kwargs)


def prepare(models: dict) -> dict:
    """The views each trained model is trained through (name -> view), before its optimizer is made.

    ddp: a Replicated view; fsdp: the model itself, sharded in place with fully_shard (each block,
    then the root; `scalars` registered as a forward method), so build the optimizer after this.
    One process: the models themselves."""
    if not active():
        return dict(models)
    if _world.strategy == "ddp":
        return {n: Replicated(m, _world.device) for n, m in models.items()}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the scalar head's output is a view: we never change it in place, which is what this warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(_world.device.type, (size(),))  # the run's device (a CPU run may have a GPU)
    for m in models.values():
        for block in m.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        register_fsdp_forward_method(m, "scalars")
        with torch.no_grad():  # FSDP2 makes the first module to run forward its root: the model, not a block
            m(torch.zeros((1, 1), dtype=torch.long, device=_world.device))
        m.reshard()  # the root keeps its weights whole after a forward; the optimizer must see the shards
    return dict(models)


def _fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard(*models) -> None:
    """FSDP2: gather the whole weights of each model on every rank (a collective) and keep them
    until reshard, so that generation and no-grad scoring — which step the ranks unevenly — run
    without further collectives. Anything else: nothing."""
    for model in models:
        if model is not None and _fsdp(model):
            for m in _fsdp_modules(model):
                m.unshard()
                m.set_reshard_after_forward(False, recurse=False)


def reshard(*models) -> None:
    """Back to the shards after unshard (each block again frees its weights after its forward;
    the root never does, FSDP2's own choice for a root)."""
    for model in models:
        if model is not None and _fsdp(model):
            for m in _fsdp_modules(model):
                if m is not model:
                    m.set_reshard_after_forward(True, recurse=False)
                m.reshard()


@contextlib.contextmanager
def gathered(*models):
    """`with gathered(model):` the block runs on whole weights (see unshard)."""
    unshard(*models)
    try:
        yield
    finally:
        reshard(*models)


def full_state_dict(model) -> dict:
    """The model's whole state dict on CPU, for a checkpoint or for keeping the best weights.
    FSDP2: gathered to rank 0 (a collective; the other ranks get {})."""
    if _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_full_state_dict(model, state: dict) -> None:
    """The inverse of full_state_dict (FSDP2: rank 0's copy is scattered to the shards)."""
    if _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(state)


def whole_model(model):
    """The model to write into a checkpoint: itself, or under FSDP2 a plain copy assembled on rank 0
    (a collective; None on the other ranks)."""
    if not _fsdp(model):
        return model
    state = full_state_dict(model)
    if not is_main():
        return None
    from .model import Transformer
    plain = Transformer(model.cfg)
    plain.load_state_dict(state)
    return plain


def _param_names(module, optimizer) -> list[str]:
    """The name of each parameter of the optimizer, in its param_groups order (the plain state
    dict's integer ids)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(optimizer, models: dict) -> dict:
    """optimizer.state_dict() as one process has it (integer ids, whole tensors); models: every
    model of the stage (an optimizer may span several). FSDP2: the shards' states gathered to
    rank 0 (a collective; {} on the other ranks), so a checkpoint resumes with any number of
    processes and either strategy."""
    if not any(_fsdp(m) for m in models.values()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    module = nn.ModuleDict(models)
    full = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return {}
    ids = {n: i for i, n in enumerate(_param_names(module, optimizer))}
    return {"state": {ids[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(optimizer, models: dict, state: dict) -> None:
    """The inverse of optimizer_state (FSDP2: each rank keeps its shard of the whole state)."""
    if not any(_fsdp(m) for m in models.values()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    module = nn.ModuleDict(models)
    names = _param_names(module, optimizer)
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    # strict=False: a parameter that never had a gradient (the policy's scalar head) has no AdamW state
    set_optimizer_state_dict(module, optimizer, full, options=StateDictOptions(full_state_dict=True, strict=False))
