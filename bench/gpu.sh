#!/usr/bin/env bash
# Everything a CUDA GPU can show, in one command (budget: under 8 minutes on an H100-class card):
#
#   bash bench/gpu.sh
#
#   1. the kernel tests on CUDA, Triton compiled for the GPU (no interpreter): fp32, bf16 and
#      fp16, odd shapes, every op against its plain-torch reference (tests/kernels/test_cuda_compiled.py)
#   2. the GPU benchmarks: the fused losses vs naive torch, Liger-Kernel and TRL at N=16384
#      tokens, V=128256, bf16 -- time, peak memory, achieved GB/s against the card's memory
#      bandwidth -- and the peak memory of a PPO update, fused vs naive (bench/conftest.py sizes)
#   3. a short PPO run of the `gpu` preset (every stage, few steps: it checks the pipeline runs
#      on the GPU end to end, not what it learns)
#   4. the markdown tables of step 2 (python -m minirlhf.bench_report)
#
# Writes bench/results/<cuda-gpu-name>.json (step 2) and bench/results/<cuda-gpu-name>.log
# (everything printed). It fails loudly, never by skipping: MINIRLHF_REQUIRE_CUDA=1 makes a
# missing GPU, any skipped test or benchmark, a kernel that does not compile or disagrees
# with its reference a non-zero exit, and the script stops at the first failing step.
# PYTHON=... picks the interpreter (default: python). MINIRLHF_GPU_SH_STEPS=1,2 runs some steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${MINIRLHF_GPU_SH_STEPS:-1,2,3,4}
export MINIRLHF_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device (torch " + torch.__version__ + ")")'
if ! "$PY" -c 'import kernels, minirlhf, triton, pytest_benchmark, liger_kernel, transformers' 2>/dev/null; then
  echo "gpu.sh: installing the project with its test and bench extras"
  "$PY" -m pip install -q -e ".[test,bench]"
fi

slug=$("$PY" bench/conftest.py)
mkdir -p bench/results
log="bench/results/$slug.log"
exec > >(tee "$log") 2>&1
start=$SECONDS
step() { echo; echo "== gpu.sh [$((SECONDS - start)) s] $*"; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
"$PY" - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF

if want 1; then
  step "1/4 kernel tests on CUDA, Triton compiled for the GPU"
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_compiled.py
fi

if want 2; then
  step "2/4 GPU benchmarks -> bench/results/$slug.json"
  "$PY" -m pytest -q -p no:cacheprovider bench/test_fused_loss_bench.py bench/test_ppo_update_bench.py \
    --benchmark-json "bench/results/$slug.json"
fi

if want 3; then
  step "3/4 a short PPO run of the gpu preset"
  run_dir=$(mktemp -d)
  # The gpu preset's model and batch shapes; fewer documents, steps and prompts, so that each
  # stage runs for seconds.
  "$PY" -m minirlhf train --preset gpu --out "$run_dir/gpu" --device cuda \
    --task.n_corpus_docs 40000 --task.n_sft_demos 1024 --task.n_rm_prompts 128 --task.n_ppo_prompts 1024 \
    --task.n_eval_prompts 64 --task.n_sft_heldout 64 --task.n_corpus_heldout 100 \
    --pretrain.steps 60 --pretrain.warmup_steps 10 --pretrain.eval_every 30 --pretrain.save_every 60 \
    --sft.epochs 1 --sft.eval_every 10 \
    --rm.epochs 1 \
    --ppo.iterations 3 --ppo.eval_every 3 --ppo.eval_prompts 64 \
    --eval.batch_size 64
  ls -l "$run_dir/gpu"
  rm -rf "$run_dir"
fi

if want 4; then
  step "4/4 report"
  if [ -f "bench/results/$slug.json" ]; then
    "$PY" -m minirlhf.bench_report --device "$slug"
  else
    echo "no bench/results/$slug.json (step 2 not run)"
  fi
fi
step "done: results in bench/results/$slug.json, log in $log"
