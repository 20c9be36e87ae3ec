"""Fixtures for the kernels tests. Triton runs in its CPU interpreter here, so this must
set TRITON_INTERPRET before anything imports triton (kernels itself imports it lazily).

MINIRLHF_REQUIRE_CUDA=1 (bench/gpu.sh) is the other mode: the interpreter stays off, so
test_cuda_compiled.py compiles the kernels for the GPU for real (and errors out instead of
skipping where it cannot). The CPU tests that force the Triton backend on CPU tensors need
the interpreter, so that mode runs test_cuda_compiled.py only.
"""

import os

REQUIRE_CUDA = os.environ.get("MINIRLHF_REQUIRE_CUDA", "0") == "1"
if not REQUIRE_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels._rows  # noqa: E402
from kernels._dispatch import force_backend  # noqa: E402


def pytest_configure(config):
    # the interpreter evaluates masked-off lanes too (log(0), 0 * inf): numpy warns, results are discarded
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Tiny Triton vocabulary blocks and torch row chunks, so that the small test shapes
    still span several blocks and chunks, the last one ragged."""
    monkeypatch.setattr(kernels._rows, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(kernels._rows, "CHUNK_ELEMENTS", 128)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Runs the test body on the chunked torch path and on the Triton kernels (interpreted)."""
    with force_backend(request.param):
        yield request.param
