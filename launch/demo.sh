#!/usr/bin/env bash
# The demo: synthetic identities -> WebDataset shards -> training on 2 CPU processes (gloo) -> the
# verification AUC on unseen identities before and after. Extra arguments are config overrides.
#   bash launch/demo.sh [key=value ...]        e.g. train.max_steps=100
# Environment: NPROC (processes, default 2), SHARDS (default shards/synth), OUT (the run, default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
shards=${SHARDS:-shards/synth} nproc=${NPROC:-2} out=${OUT:-runs/demo}

if [[ ! -f $shards/manifest.json ]]; then
  rm -rf "$shards.faces"
  "$bin/facedist-shards" synth "$shards.faces" --identities 300 --images-per-identity 12 --size 64 --seed 0
  "$bin/facedist-shards" build "$shards.faces" "$shards" --size 64 --format png --val-identities 60 --test-identities 40 --seed 0
fi
rm -rf "$out"
# `python -m accelerate.commands.launch` = `accelerate launch`, minus the CLI's eager timm import that
# would load the CPU-incompatible torchvision before facedist's compat fix (see README, Set-up)
ACCELERATE_USE_CPU=true "$bin/python" -m accelerate.commands.launch --config_file launch/cpu_2proc.yaml --num_processes "$nproc" \
  facedist/train.py --config configs/demo.yaml data.shards="$shards" output_dir="$out" "$@"
"$bin/python" - "$out/metrics.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_auc" in r]
first, last = evals[0], evals[-1]
print(f"validation AUC on unseen identities: step {first['step']}: {first['val_auc']:.4f} -> "
      f"step {last['step']}: {last['val_auc']:.4f}   (TAR@FAR=1e-2: {last['val_tar@far=1e-2']:.4f})")
PY
