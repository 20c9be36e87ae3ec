"""The pieces of minirlhf/distributed.py that need no second process: the thread rule, the shards,
the plain-torch global whitening statistics, combining RM accuracies, FSDP2's optimizer state in
the one-process format, and the option's --help."""
import pytest
import torch
import torch.distributed as dist

from minirlhf import distributed, rollout
from minirlhf.cli import build_parser
from minirlhf.data import read_preferences
from minirlhf.stages import ppo
from minirlhf.stages.rm import combine_accuracies


@pytest.mark.parametrize("env, cores, requested, expected", [
    ({}, None, 0, None),                                                          # one process: every core
    ({"OMP_NUM_THREADS": "3"}, None, 0, 3),                                       # one process: the user's
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 8, 0, 4),  # torchrun's default 1
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2, 0, 1),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 2, 0, 1),                      # never 0
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 8, 0, 3),  # the user's, not torchrun's
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}, 8, 0, 1),  # one per node: the user's 1
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 8, 5, 5),                      # --dist.threads
])
def test_threads_are_the_cores_divided_among_the_local_processes(env, cores, requested, expected):
    import os
    assert distributed.cpu_threads(requested, env=env, cores=cores) == (expected or os.cpu_count())


@pytest.fixture
def world(monkeypatch):
    """Pretend to be rank r of n (for the pure functions of distributed.py)."""
    def set_world(rank, size):
        monkeypatch.setattr(distributed._world, "rank", rank)
        monkeypatch.setattr(distributed._world, "size", size)
    return set_world


@pytest.mark.parametrize("n, size", [(8, 2), (7, 3), (2, 4), (1, 1), (10, 4)])
def test_shards_cut_the_batch_in_order(world, n, size):
    pieces = []
    for r in range(size):
        world(r, size)
        pieces.append(list(range(n))[distributed.shard_slice(n)])
        share, weight = distributed.shard(list(range(n)))
        assert (share, weight) == ((pieces[-1], 1.0) if pieces[-1] else ([0], 0.0))  # a stand-in row, weight 0
    assert [x for p in pieces for x in p] == list(range(n))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_share_of_a_mean_sums_to_the_global_mean(world):
    """DDP averages the ranks' gradients: the average of the shares is the global batch's mean."""
    values = torch.arange(10.0) ** 2
    shares = []
    for r in range(3):
        world(r, 3)
        mine, weight = distributed.shard(values)
        shares.append(distributed.share(mine.mean(), len(mine) * weight, len(values)))
    assert torch.isclose(sum(shares) / 3, values.mean())


def test_torch_global_whitening_statistics_equal_the_cpp_ones_and_the_whole_batch():
    """ppo.masked_mean_var (the plain-torch definition) against rollout.masked_mean_var (C++) and
    the whole batch: alone, and as one of k ranks that hold the same shard (an all_reduce that
    multiplies by k), whose global statistics are those of the shard repeated k times."""
    g = torch.Generator().manual_seed(3)
    B, T = 20, 17
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    x = torch.randn(B, T, generator=g) * 3 + 1.5
    x[~ppo.response_mask(lengths, T)] = float("nan")  # padding is never read
    for k in (1, 2, 3):
        valid = x[ppo.response_mask(lengths, T)].double().repeat(k)
        whole = torch.tensor([valid.mean().item(), valid.var().item()])
        all_reduce = None if k == 1 else (lambda t, k=k: t.mul_(k))
        for path in (ppo, rollout):  # the plain-torch definition and the C++ one
            stats = torch.tensor(path.masked_mean_var(x, lengths, all_reduce=all_reduce))
            assert torch.allclose(stats, whole, rtol=1e-12), (k, path.__name__)
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        ppo.masked_mean_var(x[:1], torch.tensor([1]))


def test_accuracies_of_shares_combine_into_the_whole(tiny_run):
    from minirlhf import checkpoint
    from minirlhf.reward import pairwise_accuracy

    run_dir = tiny_run[0]
    rm, tok = checkpoint.load_model_from(run_dir / "rm"), checkpoint.load_tokenizer(run_dir / "rm")
    comparisons = read_preferences(run_dir / "preferences.jsonl")[:9]
    gold_score = lambda p, r: float(len(r) % 3)  # noqa: E731 — any scorer; ties included
    whole = pairwise_accuracy(rm, tok, comparisons, 96, gold_score)
    parts = [pairwise_accuracy(rm, tok, comparisons[a:b], 96, gold_score) for a, b in ((0, 4), (4, 4), (4, 9))]
    combined = combine_accuracies(parts)
    assert combined.keys() == whole.keys()
    for k, v in whole.items():
        assert combined[k] == pytest.approx(v, rel=1e-12), k


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_fsdp_optimizer_state_is_the_one_process_state(tmp_path):
    """fully_shard on a one-process gloo group: after the same AdamW step, optimizer_state gives what
    a plain model's optimizer.state_dict() gives, and load_optimizer_state puts it back."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from minirlhf.config import PRESETS
    from minirlhf.model import Transformer
    from minirlhf.optim import make_optimizer

    cfg = PRESETS["tiny"]().model
    x = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def trained(shard: bool):
        torch.manual_seed(0)
        models = {"model": Transformer(cfg), "critic": Transformer(cfg)}
        if shard:
            for m in models.values():
                fully_shard(m)
                register_fsdp_forward_method(m, "scalars")
        opt = make_optimizer(models["model"], 1e-3, 0.1, also=((models["critic"], 2e-3),))
        (models["model"](x).float().mean() + models["critic"].scalars(x).mean()).backward()
        opt.step()
        return models, opt

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        plain_models, plain_opt = trained(False)
        models, opt = trained(True)
        expected, got = plain_opt.state_dict(), distributed.optimizer_state(opt, models)
        assert got["param_groups"] == expected["param_groups"]
        assert got["state"].keys() == expected["state"].keys()  # the policy's scalar head: no state
        for i, s in expected["state"].items():
            for k, v in s.items():
                assert torch.equal(got["state"][i][k], v), (i, k)
        fresh_models, fresh_opt = trained(True)
        distributed.load_optimizer_state(fresh_opt, fresh_models, got)
        again = distributed.optimizer_state(fresh_opt, fresh_models)
        for i, s in got["state"].items():
            for k, v in s.items():
                assert torch.equal(again["state"][i][k], v), (i, k)
        whole = distributed.whole_model(models["model"])
        for k, v in plain_models["model"].state_dict().items():
            assert torch.equal(whole.state_dict()[k], v), k
    finally:
        dist.destroy_process_group()


def test_help_states_the_strategy_and_its_default():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "--dist.strategy {auto,ddp,fsdp}" in text
    assert "auto (the default) = DDP when the PPO stage" in text and "FSDP2 otherwise" in text


def test_the_threads_option_survives_a_second_init():
    """The CLI gives --dist.threads to init; the pipeline's own init must not reset it."""
    from minirlhf import distributed

    distributed.init(options=distributed.Options(threads=3))
    distributed.init()
    assert distributed.threads_option() == 3
    distributed.init(options=distributed.Options())
    assert distributed.threads_option() == 0
