#!/usr/bin/env bash
# Stage the OpenMMLab stack for a GPU machine that has PyTorch (Python 3.12)
# but cannot install packages or compile mmcv (e.g. a lent measurement
# machine without network): wheels of mmengine/mmdet/mmseg and their pure
# dependencies, plus mmcv 2.1.0's Python part from this repo's .venv with
# tools/device/mmcv_ext_stub.py as its `_ext` (PyTorch/torchvision versions
# of the ops a RetinaNet / Faster R-CNN / segmentor step and test need:
# sigmoid focal loss (as mmcv's CUDA kernel: no autograd graph), NMS,
# RoIAlign; any other op raises when called).
#
#   bash tools/device/prepare_stack.sh          # -> .devpkgs/ (git-ignored)
#   # on the GPU machine, from the repo root (see run_benchmarks.sh):
#   bash tools/device/run_benchmarks.sh
#
# Numbers measured this way use mmcv ops from PyTorch, not mmcv's kernels:
# close for memory (same saved tensors), not necessarily for time.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$REPO/.devpkgs"
PYVER=${PYVER:-3.12}
SITE_PKGS=$(ls -d "$REPO"/.venv/lib/python3*/site-packages)
[[ -f "$SITE_PKGS/mmcv/__init__.py" ]] || {
    echo "no mmcv in $SITE_PKGS: run bash tools/setup_env.sh first" >&2; exit 1; }
mkdir -p "$DEST/whl" "$DEST/np" "$DEST/site"
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}
download "$DEST/whl" mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 \
    addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0 \
    terminaltables==3.1.10 pycocotools==2.0.11 shapely==2.2.0 \
    prettytable==3.18.0 wcwidth==0.9.4 ftfy==6.3.1
# fallback when the machine's numpy is too new for the stack
download "$DEST/np" numpy==2.4.6
rm -rf "$DEST/site/mmcv" "$DEST/site/mmcv-2.1.0.dist-info"
cp -r "$SITE_PKGS/mmcv" "$SITE_PKGS/mmcv-2.1.0.dist-info" "$DEST/site/"
rm -rf "$DEST/site/mmcv/ops/csrc" "$DEST"/site/mmcv/_ext*.so
find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} +
cp "$REPO/tools/device/mmcv_ext_stub.py" "$DEST/site/mmcv/_ext.py"
du -sh "$DEST"
