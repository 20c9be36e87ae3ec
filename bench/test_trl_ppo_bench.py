"""The reference side of "one PPO iteration vs TRL's PPO trainer" (issue 14, comparison 1).

TRL runs in its own venv (bench/trl_ppo/make_venv.sh builds it on first use: TRL is never
a dependency of minirlhf), on CPU, with four random Llama models of PPO_ITERATION_SHAPES
(bench/conftest.py). Its process times its own iterations (model construction and the
first, warm-up iteration excluded); each mode becomes one benchmark of group
PPO_ITERATION_GROUP whose time is the median iteration (convention 5):

- trl-<version>:            the trainer as shipped; gc_collect_s is the time its two
                            gc.collect() calls per iteration took
- trl-<version>-gc-removed: the same with the trainer module's gc.collect() a no-op

Our side of the group is bench/test_ppo_bench.py (same shapes, impl "minirlhf").
CUDA machines skip this comparison: it is a CPU measurement. MINIRLHF_BENCH_SIZES=smoke
skips it too: building TRL's venvs takes minutes, and a smoke run takes seconds.
"""

import pytest
from conftest import DEVICE, PPO_ITERATION_GROUP, SIZE_SET, TRL_VERSIONS, measure, trl_ppo_iteration


@pytest.fixture(scope="module", params=TRL_VERSIONS)
def trl_run(request, ppo_iteration_shapes):
    if DEVICE != "cpu":
        pytest.skip("the TRL PPO comparison is measured on CPU")
    if SIZE_SET == "smoke":
        pytest.skip("MINIRLHF_BENCH_SIZES=smoke: the TRL comparison builds TRL's venvs (minutes); "
                    "run it at normal sizes")
    return trl_ppo_iteration(request.param, ppo_iteration_shapes)


@pytest.mark.parametrize("mode", ["shipped", "gc_removed"])
def test_trl_ppo_iteration(benchmark, trl_run, mode):
    run = trl_run["modes"][mode]
    impl = f"trl-{trl_run['trl']}" + ("-gc-removed" if mode == "gc_removed" else "")
    extra = {"iteration_s": run["iteration_s"], "trl": trl_run["trl"], "transformers": trl_run["transformers"],
             "parameters": trl_run["parameters"], "shapes": trl_run["shapes"],
             "policy_parameters": trl_run["parameters"]["policy"],
             **{k: trl_run["shapes"][k] for k in ("prompts", "new_tokens", "ppo_epochs")}}
    if mode == "shipped":
        extra["gc_collect_s"] = run["gc_collect_s_median"]
    measure(benchmark, lambda: None, group=PPO_ITERATION_GROUP, impl=impl, ours=False, memory=False, rounds=1,
            time_s=run["iteration_s_median"], **extra)
