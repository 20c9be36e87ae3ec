import os

# fewer threads than cores: the suite shares a 2-core machine, and small tensors gain nothing
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One whole `train` on the tiny preset, shared by the tests that read its artefacts.

    Returns (run_dir, summary). Tests must not change what is in run_dir."""
    from minirlhf.config import PRESETS
    from minirlhf.pipeline import run_train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    summary = run_train(PRESETS["tiny"](), run_dir)
    return run_dir, summary
