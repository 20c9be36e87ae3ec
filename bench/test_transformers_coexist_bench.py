"""`import transformers` and a Llama forward still work beside our `kernels` package.

Our package shares its import name with the Hugging Face kernel downloader that
transformers looks for (README, kernels/__init__.py). Group "transformers_coexist": a
fresh interpreter imports our `kernels`, then transformers, and runs a small random
LlamaForCausalLM forward ("with_kernels"); the reference is the same interpreter with
`kernels` made unimportable (sys.modules["kernels"] = None, which importlib.util.find_spec
reports as absent). Before the times are recorded, the test checks that transformers does
not take ours for the downloader, and that both forwards give the same logits. The ratio
(import + forward time) shows what having ours installed costs transformers: nothing, is
the expected answer. tests/kernels/test_transformers_coexist.py holds the unit checks.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import measure

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "hidden":
    sys.modules["kernels"] = None
else:
    import kernels
import torch
import transformers
from transformers.utils import import_utils
t_import = time.perf_counter() - t0
cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
t1 = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits
t_forward = time.perf_counter() - t1
available = getattr(import_utils, "is_kernels_available", lambda: None)()
print(json.dumps({"import_s": t_import, "forward_s": t_forward, "logits_sum": float(logits.double().sum()),
                  "finite": bool(torch.isfinite(logits).all()), "hf_kernels_available": available,
                  "ours": sys.argv[1] != "hidden" and hasattr(kernels, "linear_ppo_loss")}))
"""


def run(mode):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("transformers")
    out = {mode: run(mode) for mode in ("ours", "hidden")}
    ours, hidden = out["ours"], out["hidden"]
    assert ours["ours"], "`import kernels` did not give minirlhf's kernels package"
    assert ours["hf_kernels_available"] is not True, "transformers took our kernels for the HF kernel downloader"
    assert ours["finite"] and hidden["finite"]
    assert ours["logits_sum"] == hidden["logits_sum"]
    return out


@pytest.mark.parametrize("mode", ["ours", "hidden"])
def test_transformers_beside_kernels(benchmark, runs, mode):
    r = runs[mode]
    impl = "with_kernels" if mode == "ours" else "without_kernels"
    measure(benchmark, lambda: None, group="transformers_coexist", impl=impl, ours=mode == "ours", memory=False,
            rounds=1, time_s=r["import_s"] + r["forward_s"], import_s=r["import_s"], forward_s=r["forward_s"],
            hf_kernels_available=r["hf_kernels_available"])
