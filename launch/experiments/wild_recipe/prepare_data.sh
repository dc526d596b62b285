#!/usr/bin/env bash
# The in-the-wild recipe search's data (this folder's README), from raw identity folders (celeba_299), nothing
# copied: identity splits as link trees (splits.py, next to this script), then per split its training identities
# aligned to 112 px shards (`facedist-shards build --align`, YuNet) and, on its test identities, an LFW-style
# pairs file (`facedist-shards pairs`, 10 folds; run_recipes.sh scores it over the test photos' embeddings).
# BIN=1 also packs it into an aligned .bin (`facedist-shards bin --align`), for facedist-eval --bin.
#   bash launch/experiments/wild_recipe/prepare_data.sh
# Environment: SPLITS (default "A B dev dev2"), SRC (default ../shared/data/celeba_299), DATA (default
# shards/wild), SEED (splits.py's and the pairs' seed, default 0), PER_FOLD (pairs per fold, default 300),
# NICE (default 15), BIN (default 0). Writes DATA/splits/ (splits.json, SPLIT/train, SPLIT/test), DATA/SPLIT/
# (shards and align.json), DATA/SPLIT.pairs.txt (and DATA/SPLIT.test.bin); what is there is kept (delete it to
# redo it).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
here=launch/experiments/wild_recipe
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
src=${SRC:-../shared/data/celeba_299} data=${DATA:-shards/wild} seed=${SEED:-0} nice=${NICE:-15}

"$bin/python" "$here"/splits.py "$src" "$data/splits" --seed "$seed"
for split in ${SPLITS:-A B dev dev2}; do
  if [[ ! -f $data/$split/manifest.json ]]; then
    nice -n "$nice" "$bin/facedist-shards" build "$data/splits/$split/train" "$data/$split" --size 112 --align
  fi
  if [[ ! -f $data/$split.pairs.txt ]]; then
    "$bin/facedist-shards" pairs "$data/splits/$split/test" "$data/$split.pairs.txt" --folds 10 \
      --per-fold "${PER_FOLD:-300}" --seed "$seed"
  fi
  if [[ ${BIN:-0} == 1 && ! -f $data/$split.test.bin ]]; then
    nice -n "$nice" "$bin/facedist-shards" bin --pairs "$data/$split.pairs.txt" --images "$data/splits/$split/test" \
      --align --size 112 --skip-missing "$data/$split.test.bin"
  fi
done
