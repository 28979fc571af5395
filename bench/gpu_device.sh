#!/usr/bin/env bash
# The device side of bench/gpu.py (docs/scaling.md, "At 7B on one GPU"), run from the
# repository root on a machine with no package registry, with .whl/ and .gpu/ carried
# (make gpu-prep): the carried wheels and this tree's fusechat (laid out as installed: merge/ and
# eval/ as fusechat.merge and fusechat.eval) go under /tmp, then the check writes $OUT/gpu.json.
#   OUT=... bash bench/gpu_device.sh [bench/gpu.py options]     (SIZE=7b, DEADLINE=480 s)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/src && mkdir -p /tmp/src && cp -r fusechat /tmp/src/ \
    && cp -r merge /tmp/src/fusechat/merge && cp -r eval /tmp/src/fusechat/eval || exit 1
export PYTHONPATH=/tmp/src:/tmp/site PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
python3 bench/gpu.py --size "${SIZE:-7b}" --toy .gpu/toy --out "$OUT" --work /tmp/work \
    --deadline "${DEADLINE:-480}" "$@" > "$OUT/stdout.txt" 2> "$OUT/stderr.txt"
rc=$?
grep -v "it/s\]" "$OUT/stderr.txt" | tail -n 60
tail -n 1 "$OUT/stdout.txt"
exit $rc
