"""Our package is imported as `kernels`, the import name of Hugging Face's kernel
downloader, which transformers probes for (utils.import_utils.is_kernels_available) and,
when it believes it present, imports names from (`from kernels import get_kernel, ...`).
transformers must keep working with ours installed: it has to see that ours is not that
package (the version it reads for `kernels` is outside the range it accepts) and fall back
to its own layers.

Runs in a fresh interpreter, so transformers' cached probes see exactly this environment.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import kernels
    assert hasattr(kernels, "ppo_loss"), kernels.__file__  # ours, not the hub downloader

    import torch
    import transformers
    from transformers.utils import import_utils
    from transformers.integrations import hub_kernels

    # transformers must not take our package for the hub kernel downloader. It reads the
    # version of the distribution shipping `kernels` (minirlhf, when installed) or, from a
    # bare source checkout, kernels.__version__: both must stay outside the range it accepts.
    import importlib.metadata
    from packaging.version import Version
    lo = getattr(import_utils, "KERNELS_MIN_VERSION", None)
    hi = getattr(import_utils, "KERNELS_MAX_VERSION", None)
    versions = {"kernels.__version__": kernels.__version__}
    try:
        versions["minirlhf"] = importlib.metadata.version("minirlhf")
    except importlib.metadata.PackageNotFoundError:
        pass
    for name, v in versions.items():
        assert lo is None or not (Version(lo) <= Version(v) < Version(hi or "9999")), (name, v, lo, hi)
    assert import_utils.is_kernels_available() is False
    assert hub_kernels.lazy_load_kernel("not-a-kernel") is None
    assert hub_kernels.is_kernel("kernels-community/flash-attn") is True  # a pure name check

    # a model whose layers carry transformers' hub-kernel decorators builds and runs
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 32)

    # and our ops take its logits
    logp = kernels.token_logprobs(logits[:, :-1], ids[:, 1:])
    assert logp.shape == (1, 3) and bool((logp <= 0).all())
    print("ok", transformers.__version__)
    """
)


def test_transformers_imports_and_runs_with_ours_installed():
    pytest.importorskip("transformers")  # in the `test` extras; skipped only in a bare env
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")
