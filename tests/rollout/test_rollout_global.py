"""Advantage whitening with the statistics of a batch split over ranks (issue 13): the shards,
whitened with `masked_mean_var`'s global mean and variance, equal the whole batch whitened
in one process — on the C++ path and the torch one."""
import math
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from minirlhf import rollout
from minirlhf.stages import ppo


def batch(seed, B=24, T=37, loc=3.0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    x = torch.randn(B, T, generator=g) * 2 + loc
    x[~ppo.response_mask(lengths, T)] = math.nan
    return x, lengths


def in_threads(shards):
    """masked_mean_var on each shard in its own thread, as ranks would, with an all-reduce
    over the threads (sums in rank order, in place: torch.distributed.all_reduce's contract)."""
    world = len(shards)
    barrier, parts, results = threading.Barrier(world), [None] * world, [None] * world

    def rank(r):
        def all_reduce(t):
            parts[r] = t.clone()
            barrier.wait()
            t.copy_(sum(parts[1:], parts[0]))
            barrier.wait()

        results[r] = rollout.masked_mean_var(*shards[r], all_reduce=all_reduce)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_global_statistics_of_shards_equal_the_whole_batch():
    x, lengths = batch(0)
    whole = x[ppo.response_mask(lengths, x.shape[1])].double()
    mean, var = rollout.masked_mean_var(x, lengths)
    tight = dict(rel_tol=1e-12)
    assert math.isclose(mean, whole.mean().item(), **tight)
    assert math.isclose(var, whole.var().item(), **tight)
    for cuts in ([10], [1, 23], [5, 6, 17]):
        shards = [(x[a:b], lengths[a:b]) for a, b in zip([0] + cuts, cuts + [len(lengths)])]
        results = in_threads(shards)
        assert all(r == results[0] for r in results)  # every rank has the same statistics
        assert math.isclose(results[0][0], mean, **tight) and math.isclose(results[0][1], var, **tight)


def test_whitening_shards_with_global_statistics_equals_whitening_the_whole_batch():
    x, lengths = batch(1)
    cut = 9
    shards = [(x[:cut], lengths[:cut]), (x[cut:], lengths[cut:])]
    (mean, var), _ = in_threads(shards)
    for path in (rollout, ppo):
        for shift_mean in (True, False):
            whole = path.whiten(x, lengths, shift_mean)
            pieces = torch.cat([path.whiten(s, n, shift_mean, mean=mean, var=var) for s, n in shards])
            torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(pieces, ppo.whiten(x, lengths, shift_mean), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # two processes that import torch: ~10 s on a busy 2-core machine
def test_two_gloo_ranks_whiten_as_one_process(tmp_path):
    """torch.distributed (gloo, 2 processes): each rank whitens its shard with the global statistics."""
    x, lengths = batch(2, B=16, T=21)
    torch.save({"x": x, "lengths": lengths}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        from minirlhf import rollout
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=rank, world_size=2)
        b = torch.load("{tmp_path}/batch.pt")
        rows = slice(0, 5) if rank == 0 else slice(5, None)
        x, lengths = b["x"][rows], b["lengths"][rows]
        mean, var = rollout.masked_mean_var(x, lengths, all_reduce=dist.all_reduce)
        torch.save({{"stats": (mean, var), "whitened": rollout.whiten(x, lengths, mean=mean, var=var)}},
                   f"{tmp_path}/rank{{rank}}.pt")
        dist.destroy_process_group()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["stats"] == ranks[1]["stats"]
    mean, var = rollout.masked_mean_var(x, lengths)
    assert math.isclose(ranks[0]["stats"][0], mean, rel_tol=1e-12)
    assert math.isclose(ranks[0]["stats"][1], var, rel_tol=1e-12)
    pieces = torch.cat([r["whitened"] for r in ranks])
    torch.testing.assert_close(pieces, rollout.whiten(x, lengths), rtol=1e-6, atol=1e-6)
