#!/usr/bin/env bash
# Issue 13's GPU numbers in ONE device call of at most 9 minutes (each step has its own time limit and the script
# stops starting steps at 530 s); logs and JSON go to $OUT (default ./gpu_out), written as each step ends.
#
# The device machine has torch (2.11) and torchvision but no open_clip; bring wheels. On a machine with network:
#   pip download open_clip_torch ftfy wcwidth timm regex tqdm --no-deps -d wheels/     # wheels/ is git-ignored
# then, from the session:  run(command="bash benchmarks/gpu_check.sh", carry=["wheels"], timeout_s=570)
#
# Steps, in order of what matters most:
#   1. bench.py eager, batch 128, all five methods (img/s, MFU, peak memory)              bench_eager_b128.json
#   2. bench.py MILAN batch 128 with --variant fp32_teacher (before the bf16 teacher)      bench_milan_fp32_teacher_b128.json
#   3. bench.py --profile MILAN batch 128 (kernel-time shares, copies per step)           profile_milan_b128.json
#   4. loader.py cpu vs device, 12 workers, 6400 generated JPEGs, and milan.py end to end
#      (torchrun, batch 128, 12 workers) with each path, to compare with step 1's MILAN   loader.json
#   5. bench.py --compile, batch 256: MILAN first, then the others as time allows          bench_compiled_b256.json
set -u
OUT=${OUT:-gpu_out}
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

python -c "import open_clip, tqdm" 2>/dev/null || pip install --no-deps --no-index wheels/*.whl >"$OUT/pip.log" 2>&1
python -c "import open_clip, tqdm" || { echo "open_clip missing: carry wheels/ (see the header)"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  nproc; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

DATA=/tmp/gpu_check_jpegs
python -c "import sys; sys.path.insert(0, 'benchmarks'); import loader; loader.jpeg_folder('$DATA', 6400)" &
GEN=$!

BENCH="python benchmarks/bench.py --device cuda --model vit_base_patch16 --teacher ViT-B-16 --teacher_weights none"
step bench_eager_b128 170 $BENCH --batch_size 128 --warmup 3 --steps 10 \
    --methods milan,mask_align,mr_mae,cae_v2,cae --json "$OUT/bench_eager_b128.json"
step bench_milan_fp32_teacher_b128 45 $BENCH --batch_size 128 --warmup 3 --steps 10 --methods milan \
    --variant fp32_teacher --json "$OUT/bench_milan_fp32_teacher_b128.json"
step profile_milan_b128 45 $BENCH --batch_size 128 --warmup 3 --steps 5 --methods milan --profile \
    --json "$OUT/profile_milan_b128.json"
wait $GEN
step loader 150 python benchmarks/loader.py --device cuda --data "$DATA" --workers 12 --batch_size 128 \
    --end_to_end 128 --json "$OUT/loader.json"
step bench_compiled_b256 400 $BENCH --batch_size 256 --warmup 3 --steps 10 --compile \
    --methods milan,mask_align,mr_mae,cae_v2,cae --json "$OUT/bench_compiled_b256.json"
echo "done at $(($(date +%s) - START))s; results in $OUT"
