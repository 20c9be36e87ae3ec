"""Fixtures of the label tests: (once per test session) a tiny pretrained checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny pretrained checkpoint (seconds): something real to sample responses from."""
    from minirlhf.cli import main

    run = tmp_path_factory.mktemp("tiny")
    assert main(["pretrain", "--preset", "tiny", "--out", str(run)]) == 0
    return run / "pretrain"


@pytest.fixture(scope="session")
def tiny_ckpt_b(tiny_ckpt, tmp_path_factory) -> Path:
    """A second checkpoint directory (a copy of tiny_ckpt): --compare refuses one checkpoint twice."""
    import shutil

    return Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("tiny_b") / "pretrain"))
