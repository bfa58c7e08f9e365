#!/usr/bin/env bash
# The GPU numbers in ONE device call of at most 9 minutes (each step has its own time limit and the script
# stops starting steps at 530 s); logs and JSON go to $OUT (default ./gpu_out), written as each step ends.
#
# The device machine has torch (2.11) and torchvision but no open_clip; bring wheels (wheels/ is git-ignored, ~8 MB).
# On a machine with network (regex is compiled: one wheel per Python version, pip picks the one that fits):
#   pip download open_clip_torch ftfy wcwidth timm tqdm --no-deps -d wheels/
#   for v in 3.10 3.11 3.12 3.13; do pip download regex --no-deps --only-binary=:all: --python-version $v \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels/; done
# then, from the session:  run(command="bash benchmarks/gpu_check.sh", carry=["wheels"], timeout_s=570)
#
# Steps, in order of what matters most:
#   1. bench.py eager, batch 128, all five methods (img/s, MFU, peak memory)              bench_eager_b128.json
#   2. bench.py MILAN batch 128 with --variant fp32_teacher (before the bf16 teacher)      bench_milan_fp32_teacher_b128.json
#   3. bench.py --profile MILAN batch 128 (kernel-time shares, copies per step)           profile_milan_b128.json
#   4. loader.py: the MAE reference pipeline vs ours, 12 workers, both JPEG sets         loader.json
#      and milan.py end to end (torchrun, batch 128, 12 workers) on 500 x 375 JPEGs,
#      the training bar's img/s of its second epoch, to compare with step 1's MILAN       e2e_milan_b128.log
#   5. bench.py --compile, batch 256: MILAN first, then the others as time allows          bench_compiled_b256.json
# A CPU smoke of this script's plumbing (minutes):  DEVICE=cpu MODEL=vit_nano_patch16 TEACHER=tiny NIMG=64 B1=8 B2=8 \
#   WORKERS=1 COMPILED=milan OUT=/tmp/gc bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu_out} DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-vit_base_patch16} TEACHER=${TEACHER:-ViT-B-16}
NIMG=${NIMG:-6400} B1=${B1:-128} B2=${B2:-256} WORKERS=${WORKERS:-12} COMPILED=${COMPILED:-milan,mask_align,mr_mae,cae_v2,cae}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((530 - ($(date +%s) - START))); }
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 l
    shift 2
    l=$(left)
    if [ "$l" -lt 25 ]; then echo "== $name: skipped, no time left"; return; fi
    [ "$limit" -gt "$l" ] && limit=$l
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? at $(($(date +%s) - START))s"
    grep -v "it/s\]" "$OUT/$name.log" | tail -n 14
}

python -c "import open_clip, tqdm" 2>/dev/null || pip install --no-deps --no-index --find-links wheels \
    open_clip_torch ftfy wcwidth regex tqdm timm >"$OUT/pip.log" 2>&1
python -c "import open_clip, tqdm" || { echo "open_clip missing: carry wheels/ (see the header)"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "cores: $(nproc --all)"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

DATA=/tmp/gpu_check_jpegs
python -c "import sys; sys.path.insert(0, 'benchmarks'); import loader; loader.jpeg_folder('$DATA', $NIMG, '500x375')" &
GEN=$!

BENCH="python benchmarks/bench.py --device $DEVICE --model $MODEL --teacher $TEACHER --teacher_weights none"
step bench_eager_b128 170 $BENCH --batch_size $B1 --warmup 3 --steps 10 \
    --methods milan,mask_align,mr_mae,cae_v2,cae --json "$OUT/bench_eager_b128.json"
step bench_milan_fp32_teacher_b128 45 $BENCH --batch_size $B1 --warmup 3 --steps 10 --methods milan \
    --variant fp32_teacher --json "$OUT/bench_milan_fp32_teacher_b128.json"
step profile_milan_b128 45 $BENCH --batch_size $B1 --warmup 3 --steps 5 --methods milan --profile \
    --json "$OUT/profile_milan_b128.json"
wait $GEN
step loader 100 python benchmarks/loader.py --device $DEVICE --workers $WORKERS --batch_size $B1 --images $NIMG \
    --json "$OUT/loader.json"
step e2e_milan_b128 100 python -m torch.distributed.run --standalone --nproc_per_node=1 milan.py --data "$DATA" \
    --model $MODEL --teacher $TEACHER --teacher_weights none --batch_size $B1 --accum_iter 1 --num_workers $WORKERS \
    --epochs 2 --warmup_epochs 1 --log_every 5 --output_dir /tmp/gpu_check_e2e
grep -o "epoch 1:.*img_s=[0-9.]*" "$OUT/e2e_milan_b128.log" | grep -o "img_s=[0-9.]*" | tail -n 1
step bench_compiled_b256 400 $BENCH --batch_size $B2 --warmup 3 --steps 10 --compile \
    --methods $COMPILED --json "$OUT/bench_compiled_b256.json"
echo "done at $(($(date +%s) - START))s; results in $OUT"
