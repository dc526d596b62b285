#!/usr/bin/env bash
# Loss and optimizer comparison on the synthetic identities, same budget for every run: the demo's model,
# data, global batch (2 processes x 16 identities x 4 images) and steps; only the loss or optimizer differs.
# Each run is then scored by facedist-eval on the test identities (never trained on, never used to
# choose anything) and a markdown table is printed (this folder's README).
#   bash launch/experiments/loss_comparison/compare_losses.sh [key=value ...]     extra overrides apply to every run
# Environment: NPROC (default 2), SHARDS (default shards/synth, made like launch/demo.sh when missing),
# OUT (default runs/compare), ONLY (space-separated run names to (re)run; the table covers all present).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
shards=${SHARDS:-shards/synth} nproc=${NPROC:-2} out=${OUT:-runs/compare}

declare -A runs=(
  [triplet]="loss.pair=triplet"
  [arcface]="loss.pair=none loss.head=arcface loss.scale=64 loss.margin=0.5"
  [cosface]="loss.pair=none loss.head=cosface loss.scale=64 loss.margin=0.4"
  [sphereface]="loss.pair=none loss.head=sphereface loss.scale=64 loss.margin=4"
  [adacos_fixed]="loss.pair=none loss.head=adacos_fixed"
  [triplet_adamw_cosine]="loss.pair=triplet optim.name=adamw_cosine optim.warmup_steps=50"
)
order="triplet arcface cosface sphereface adacos_fixed triplet_adamw_cosine"

if [[ ! -f $shards/manifest.json ]]; then
  rm -rf "$shards.faces"
  "$bin/facedist-shards" synth "$shards.faces" --identities 300 --images-per-identity 12 --size 64 --seed 0
  "$bin/facedist-shards" build "$shards.faces" "$shards" --size 64 --format png --val-identities 60 --test-identities 40 --seed 0
fi
for name in ${ONLY:-$order}; do
  rm -rf "${out:?}/$name"
  # shellcheck disable=SC2086  # the run's overrides are words
  ACCELERATE_USE_CPU=true "$bin/python" -m accelerate.commands.launch --config_file launch/cpu_2proc.yaml --num_processes "$nproc" \
    facedist/train.py --config configs/demo.yaml data.shards="$shards" output_dir="$out/$name" checkpoint.every=0 ${runs[$name]} "$@"
  "$bin/facedist-eval" --checkpoint "$out/$name" --shards "$shards" --split test --out "$out/$name/test_eval" --cpu
done
table_args=(); for name in $order; do table_args+=("$name" "${runs[$name]}"); done
"$bin/python" - "$out" "${table_args[@]}" <<'PY'
import json, sys
from pathlib import Path

out, args = Path(sys.argv[1]), sys.argv[2:]
fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
print("| run | overrides of configs/demo.yaml | test AUC | EER | TAR@FAR=1e-3 | TAR@FAR=1e-2 | rank-1 | val AUC (last) |")
print("|---|---|---|---|---|---|---|---|")
for name, overrides in zip(args[::2], args[1::2]):
    report = out / name / "test_eval" / "metrics.json"
    if not report.exists():
        continue
    m = json.loads(report.read_text())
    val_auc = [r["val_auc"] for r in map(json.loads, open(out / name / "metrics.jsonl")) if "val_auc" in r][-1]
    print(f"| {name} | `{overrides}` | {fmt(m['auc'])} | {fmt(m['eer'])} | {fmt(m['tar_at_far']['1e-03'])} | "
          f"{fmt(m['tar_at_far']['1e-02'])} | {fmt(m['cmc']['rank1'])} | {fmt(val_auc)} |")
PY
