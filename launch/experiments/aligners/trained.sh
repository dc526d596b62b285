#!/usr/bin/env bash
# The accuracy each aligner leads to after training (issue 32, part 1; this folder's README): the in-the-wild
# recipe search's dev split (launch/experiments/wild_recipe) aligned by the Haar cascades facedist had before
# (haar_crops.py, next to this script) and trained and tested exactly as that search trains and tests its
# YuNet-aligned runs (its run_recipes.sh, CROPS=1: the test photos are Haar crops already). The YuNet side is that
# search's own run of the same recipe, split and seed (runs/wild_recipe/SPLIT/NAME/seedSEED/test.json); both are
# then scored again on the photos both aligners found (common_photos.py).
#   bash launch/experiments/aligners/trained.sh
# Environment: SPLIT (default dev), NAME (runs.tsv's run, default wild_16x4), SEED (default 0), WILD (the
# search's data, default shards/wild), DATA (the Haar data, default shards/wild_haar), OUT (default
# runs/aligners_trained; the Haar runs' records go to OUT/results, never among the search's YuNet ones in
# launch/experiments/wild_recipe/results), NICE (default 15). Needs `SPLITS=$SPLIT bash launch/experiments/wild_recipe/prepare_data.sh`
# first. What is there is kept (delete it to redo it).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
split=${SPLIT:-dev} wild=${WILD:-shards/wild} data=${DATA:-shards/wild_haar} nice=${NICE:-15}
for part in train test; do
  if [[ ! -f $data/splits/$split/$part.missed.json ]]; then
    nice -n "$nice" "$bin/python" launch/experiments/aligners/haar_crops.py "$wild/splits/$split/$part" \
      "$data/splits/$split/$part"
  fi
done
if [[ ! -f $data/$split/manifest.json ]]; then
  nice -n "$nice" "$bin/facedist-shards" build "$data/splits/$split/train" "$data/$split" --size 112
fi
name=${NAME:-wild_16x4} seed=${SEED:-0} out=${OUT:-runs/aligners_trained}
CROPS=1 DATA=$data OUT=$out RESULTS=$out/results SPLITS=$split SEEDS=$seed ONLY=$name NICE=$nice \
  bash launch/experiments/wild_recipe/run_recipes.sh
# both runs again on the photos both aligners found (common_photos.py, next to this script)
yunet=runs/wild_recipe/$split/$name/seed$seed/test.npz
[[ -f $yunet ]] || { echo "no YuNet run to compare with: $yunet (run_recipes.sh SPLITS=$split ONLY=$name)" >&2; exit 2; }
"$bin/python" launch/experiments/aligners/common_photos.py "$yunet" "$out/$split/$name/seed$seed/test.npz"
