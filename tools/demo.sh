#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment if needed, prepare
# the real demo data (aerial tree crowns shipped in the `deepforest` wheel),
# train a small detector on the CPU (or GPU if present) for a few minutes and
# evaluate it with mmdet's CocoMetric, printing the bbox mAP table.
#
#   bash tools/demo.sh                       # default demo config
#   bash tools/demo.sh CONFIG [train.py args]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash tools/setup_env.sh
VENV="${MMLOCAL_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

CONFIG="${1:-configs/demo/retinanet_r18_fpn_1xb4-300i_demo-trees.py}"
shift || true
NAME="$(basename "${CONFIG%.py}")"
WORK_DIR="${WORK_DIR:-work_dirs/$NAME}"

"$PY" tools/data/prepare_demo.py --out data/demo --cache data/cache
"$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" "$@"
echo
echo "[demo] final evaluation of $WORK_DIR/$(cat "$WORK_DIR/last_checkpoint" | xargs basename)"
"$PY" tools/test.py "$CONFIG" "$(cat "$WORK_DIR/last_checkpoint")" --work-dir "$WORK_DIR"
