#!/usr/bin/env bash
# The GPU-only checks in one command, for a lent GPU machine (see ../shared/GPU.md): mixed-precision
# training runs (bf16, fp16 with loss scaling), training throughput (bf16, channels_last, compile on/off,
# against the ImageFolder + MPerClassSampler baseline), the input pipeline (CPU vs nvJPEG decode), the
# sharded head at 10k..1M identities, the pair losses at a global batch of 1,024 / 4,096, and the host
# syncs of a training step counted on the GPU (tests/count_syncs.py with
# torch.cuda.set_sync_debug_mode("warn"): CUDA's own warnings in the log).
# Writes JSON and logs under $OUT (default runs/gpu_checks). Commit the figures with the device name.
#   bash launch/gpu_checks.sh                 # on the GPU machine, from the repository root
#   SMALL=1 bash launch/gpu_checks.sh         # a few steps of everything (also on a CPU: checks the script)
# Wheels the machine lacks are installed from .whl/ when present (GPU.md says how to fetch them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_checks}; mkdir -p "$out"
py=python3; [[ -x .venv/bin/python ]] && py=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$py -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', torch.__version__)" \
  | tee "$out/device.txt"

if [[ -n ${SMALL:-} ]]; then ids=40 steps=4 bench_steps=3 size=64 classes=1000,10000 backbone=resnet10t
else ids=1000 steps=200 bench_steps=30 size=224 classes=10000,100000,1000000 backbone=tf_efficientnetv2_b0; fi
shards=$out/shards
if [[ ! -f $shards/manifest.json ]]; then
  $py -m facedist.data.cli synth "$out/faces" --identities "$ids" --images-per-identity 10 --size 112 --seed 0 --workers 16
  $py -m facedist.data.cli build "$out/faces" "$shards" --size "$size" --val-identities 0.1 --test-identities 0 --workers 16 --quiet
fi
overrides=("data.shards=$shards" "model.backbone=$backbone" "model.image_size=$size" data.num_workers=8
           "train.max_steps=$steps" train.log_every=10 eval.every=0 checkpoint.every=0)

# 1. mixed precision end to end: finite losses, fp32 weights, the fp16 loss scaler at work
for precision in bf16 fp16; do
  $py facedist/train.py --config configs/effnetv2b0_triplet_2000ids.yaml "${overrides[@]}" "train.mixed_precision=$precision" "output_dir=$out/train_$precision" \
    > "$out/train_$precision.log" 2>&1 || { echo "train $precision FAILED (see $out/train_$precision.log)"; }
  tail -n 2 "$out/train_$precision/metrics.jsonl" 2>/dev/null || true
done

# 2. training throughput: model only / data only / end to end / baseline
for variant in "train.mixed_precision=bf16" "train.mixed_precision=bf16 model.channels_last=true" \
               "train.mixed_precision=bf16 model.channels_last=true model.compile=true" "train.mixed_precision=no"; do
  name=$(echo "$variant" | sed 's/[ =.]/_/g')
  # shellcheck disable=SC2086  # the variant's overrides are words
  $py -m facedist.bench train --config configs/effnetv2b0_triplet_2000ids.yaml --steps "$bench_steps" --folder "$out/faces" \
    --out "$out/bench_train_$name.json" "${overrides[@]}" $variant > "$out/bench_train_$name.log" 2>&1 \
    || echo "bench train $variant FAILED"
done

# 2b. input pipeline (issue 13): images/s per core with the device step on the GPU, CPU vs nvJPEG decode, and
# the training step at 112 px in bf16, end to end (data.decode=gpu) against model only (goal >= 0.9)
for px in 112 224; do
  for decode in cpu gpu; do
    $py -m facedist.bench data --config configs/effnetv2b0_triplet_2000ids.yaml --shards "$shards" --image-size "$px" --device cuda \
      --out "$out/bench_data_${px}_$decode.json" "data.decode=$decode" > "$out/bench_data_${px}_$decode.log" 2>&1 \
      || echo "bench data $px $decode FAILED"
  done
done
$py -m facedist.bench train --config configs/effnetv2b0_triplet_2000ids.yaml --steps "$bench_steps" --folder "$out/faces" \
  --out "$out/bench_train_112_bf16_gpu_decode.json" "${overrides[@]}" model.image_size=112 train.mixed_precision=bf16 \
  data.decode=gpu > "$out/bench_train_112_bf16_gpu_decode.log" 2>&1 || echo "bench train 112 bf16 gpu decode FAILED"

# 3. the sharded head: memory per rank and step time, one GPU (more GPUs: --world-sizes 1,2,...)
$py -m facedist.bench head --classes "$classes" --rates 1.0,0.1 --steps 5 --out "$out/bench_head.json" \
  > "$out/bench_head.log" 2>&1 || echo "bench head FAILED"
$py -m facedist.bench head --classes "$classes" --rates 1.0,0.1 --steps 5 --mixed-precision bf16 \
  --out "$out/bench_head_bf16.json" > "$out/bench_head_bf16.log" 2>&1 || echo "bench head bf16 FAILED"
# the whole training step around the head (the recipe's backbone, 32 images per GPU): peak memory next to 1M ids
$py -m facedist.bench head --classes "$classes" --rates 0.1 --steps 5 --mixed-precision bf16 --batch 32 \
  --backbone "$backbone" --image-size "$size" --out "$out/bench_head_train_step.json" \
  > "$out/bench_head_train_step.log" 2>&1 || echo "bench head train step FAILED"

# 4. pair losses over a large global batch: peak memory and time per rank (W = 8 ranks' share)
$py -m facedist.bench loss --batch 1024,4096 --pml --out "$out/bench_loss.json" > "$out/bench_loss.log" 2>&1 \
  || echo "bench loss FAILED"

# 5. what a training step waits on, on the GPU: counted syncs/collectives per step, and CUDA's sync warnings
$py tests/count_syncs.py "$out/count_syncs" --config configs/effnetv2b0_triplet_2000ids.yaml "${overrides[@]}" train.max_steps=6 train.log_every=3 \
  train.mixed_precision=bf16 -- head_and_triplet loss.head=arcface "output_dir=$out/count_head_triplet" \
  -- triplet "output_dir=$out/count_triplet" -- head loss.pair=none loss.head=arcface "output_dir=$out/count_head" \
  > "$out/count_syncs.log" 2>&1 || echo "count syncs FAILED"
echo "CUDA sync warnings in the counted runs: $(grep -c 'called a synchronizing CUDA operation' "$out/count_syncs.log" || true)"

rm -rf "$out/faces" "$shards"  # keep what comes back small
ls -la "$out"
