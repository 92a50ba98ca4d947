#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment if needed, prepare
# the real demo data (aerial tree crowns shipped in the `deepforest` wheel),
# train a small detector with supervised local learning on the CPU (or GPU
# if present) for a few minutes, evaluate it with mmdet's CocoMetric (bbox mAP
# table), and measure its training-memory saving against end-to-end training.
#
#   bash tools/demo.sh                        # InfoPro K=2 RetinaNet-R18
#   bash tools/demo.sh CONFIG [train.py args]  # any other config
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash tools/setup_env.sh
VENV="${MMLOCAL_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

CONFIG="${1:-configs/demo/infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py}"
shift || true
NAME="$(basename "${CONFIG%.py}")"
WORK_DIR="${WORK_DIR:-work_dirs/$NAME}"

"$PY" tools/data/prepare_demo.py --out data/demo --cache data/cache
"$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" "$@"
CKPT="$(cat "$WORK_DIR/last_checkpoint")"
echo
echo "[demo] final evaluation of $CKPT"
"$PY" tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR/test" \
    | tee "$WORK_DIR/test.log"

if grep -q "LocalLearner" <("$PY" -c "from mmengine.config import Config; print(Config.fromfile('$CONFIG').model.type)" 2>/dev/null); then
    echo
    echo "[demo] training memory: end-to-end vs local learning, one batch of 4x3x320x320"
    "$PY" tools/analysis/benchmark_memory.py "$CONFIG" --modes e2e local \
        --input-shape 4 3 320 320 --iters 1 --json "$WORK_DIR/memory.json"
    "$PY" - "$WORK_DIR" <<'PYEOF'
import json, re, sys
work = sys.argv[1]
log = open(f'{work}/test.log').read()
m = re.findall(r'bbox_mAP_copypaste: ([-\d.]+) ([-\d.]+)', log)
res = json.load(open(f'{work}/memory.json'))['modes']
e2e, local = res['e2e'], res['local']
print()
print('[demo] summary')
if m:
    print(f'  bbox mAP {m[-1][0]}  (mAP@0.5 {m[-1][1]}) on the held-out tiles')
print(f"  training-step peak memory: local {local['peak_bytes'] / 2**20:.1f} MiB"
      f" vs end-to-end {e2e['peak_bytes'] / 2**20:.1f} MiB"
      f" ({local['peak_bytes'] / e2e['peak_bytes']:.2f}x)")
PYEOF
fi
