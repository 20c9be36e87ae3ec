"""The two-process `train` runs several distributed tests compare (DDP and FSDP2)."""
import pytest

from .launch import ok, torchrun


@pytest.fixture(scope="session")
def ddp_train(tmp_path_factory):
    """`train --preset tiny` on 2 processes with DDP: (run_dir, the launch's result)."""
    out = tmp_path_factory.mktemp("ddp_train")
    r = torchrun("train", "--preset", "tiny", "--out", out)
    ok(r)
    return out, r


@pytest.fixture(scope="session")
def fsdp_train(tmp_path_factory):
    """The same with FSDP2."""
    out = tmp_path_factory.mktemp("fsdp_train")
    r = torchrun("train", "--preset", "tiny", "--out", out, "--dist.strategy", "fsdp")
    ok(r)
    return out, r
