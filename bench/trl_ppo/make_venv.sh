#!/usr/bin/env bash
# Builds the virtual environment the PPO-iteration benchmark runs TRL in:
#
#   bash bench/trl_ppo/make_venv.sh 1.12.0    # -> bench/.venv-trl-1.12.0 (trl.experimental.ppo)
#   bash bench/trl_ppo/make_venv.sh 0.11.4    # -> bench/.venv-trl-0.11.4 (PPOv2Trainer; the last with the classic PPOTrainer)
#
# TRL is never a dependency of minirlhf: it lives in its own venv (git-ignored), beside
# the same torch as ours. torch is installed first and pinned, so that pip resolves TRL's
# other requirements around it instead of pulling another (CUDA) build of torch. The
# transformers/accelerate/datasets pins are releases contemporary with each TRL release
# (a TRL release breaks with transformers versions made after it).
set -euo pipefail
version=${1:?usage: make_venv.sh TRL_VERSION   (1.12.0 or 0.11.4)}
torch_version=${TORCH_VERSION:-2.13.0}
bench=$(cd "$(dirname "$0")/.." && pwd)
venv="$bench/.venv-trl-$version"
case "$version" in
  1.12.0) pins=("trl==1.12.0") ;;
  0.11.4) pins=("trl==0.11.4" "transformers==4.46.3" "accelerate==1.1.1" "datasets==3.1.0" "rich" "numpy<2.3") ;;
  *) echo "make_venv.sh: TRL $version is not one this benchmark knows (1.12.0, 0.11.4)" >&2; exit 2 ;;
esac
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import trl, torch, sys; sys.exit(trl.__version__ != '$version')" 2>/dev/null; then
  echo "$venv: trl $version already installed"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==$torch_version"
"$venv/bin/pip" install -q "torch==$torch_version" "${pins[@]}"
"$venv/bin/python" -c "import torch, transformers, trl; print('$venv: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
