#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment if needed, prepare
# the real demo data (aerial tree crowns shipped in the `deepforest` wheel),
# train a small detector with supervised local learning on the CPU (or GPU
# if present) for a few minutes, evaluate it with mmdet's CocoMetric (bbox mAP
# table), and measure its training-memory saving against end-to-end training.
#
#   bash tools/demo.sh                        # DGL K=3 RetinaNet-R18
#   bash tools/demo.sh CONFIG [train.py args]  # any other config
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash tools/setup_env.sh
VENV="${MMLOCAL_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

CONFIG="${1:-configs/demo/dgl_retinanet_r18_fpn_k3_1xb4-300i_demo-trees.py}"
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

# the training batch of the config: N x 3 x H x W from its dataloader and
# its Resize scale (w, h)
read_cfg() {
    "$PY" - "$CONFIG" <<'PYEOF'
import sys
from mmengine.config import Config
cfg = Config.fromfile(sys.argv[1])
if not str(cfg.model.get('type', '')).endswith('LocalLearner'):
    sys.exit(0)
scale = next((t['scale'] for t in cfg.train_dataloader.dataset.pipeline
              if t['type'] == 'Resize'), (320, 320))
print(cfg.train_dataloader.batch_size, 3, scale[1], scale[0])
PYEOF
}
SHAPE="$(read_cfg 2>/dev/null || true)"
if [ -n "$SHAPE" ]; then
    echo
    echo "[demo] training memory: end-to-end vs local learning, one batch of ${SHAPE// /x}"
    "$PY" tools/analysis/benchmark_memory.py "$CONFIG" --modes e2e local \
        --input-shape $SHAPE --iters 1 --json "$WORK_DIR/memory.json"
    rm -f "$WORK_DIR/memory_800x1333.json"
    # exit status 0 (true) when local learning saves nothing here
    if "$PY" - "$WORK_DIR/memory.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))['modes']
sys.exit(m['local']['peak_bytes'] < m['e2e']['peak_bytes'])
PYEOF
    then
        # no saving at this size: measure the same config at a realistic
        # detection input too (activations grow with the pixels, parameter
        # gradients do not)
        echo
        echo "[demo] no saving at ${SHAPE// /x}: the same config at 2x3x800x1333"
        "$PY" tools/analysis/benchmark_memory.py "$CONFIG" --modes e2e local \
            --input-shape 2 3 800 1333 --iters 1 \
            --json "$WORK_DIR/memory_800x1333.json"
    fi
    "$PY" - "$WORK_DIR" "$SHAPE" <<'PYEOF'
import json, os, re, sys
work, shape = sys.argv[1], sys.argv[2].replace(' ', 'x')
log = open(f'{work}/test.log').read()
m = re.findall(r'bbox_mAP_copypaste: ([-\d.]+) ([-\d.]+)', log)


def ratio(path):
    res = json.load(open(path))['modes']
    e2e, local = res['e2e']['peak_bytes'], res['local']['peak_bytes']
    return local, e2e, local / e2e


local, e2e, r = ratio(f'{work}/memory.json')
print()
print('[demo] summary')
if m:
    print(f'  bbox mAP {m[-1][0]}  (mAP@0.5 {m[-1][1]}) on the held-out tiles')
print(f'  training-step peak memory: local {local / 2**20:.1f} MiB'
      f' vs end-to-end {e2e / 2**20:.1f} MiB ({r:.2f}x) at {shape}')
print('  (tensors live during one training step: parameters, gradients,'
      ' optimizer state,')
print('  activations; the training log\'s peak_mem_mb is, on the CPU, the'
      ' process\'s peak RSS,')
print('  which adds the Python heap, the libraries and the data loading)')
big = f'{work}/memory_800x1333.json'
if r >= 1.0 and os.path.isfile(big):
    local, e2e, r = ratio(big)
    hint = '' if r < 1.0 else (
        ': its largest module with its aux net holds at least as much as the '
        'whole network; cut earlier (tools/analysis/plan_split.py)')
    print(f'  no saving at {shape}; at 2x3x800x1333: local '
          f'{local / 2**20:.1f} MiB vs end-to-end {e2e / 2**20:.1f} MiB '
          f'({r:.2f}x){hint}')
PYEOF
fi
