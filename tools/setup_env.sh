#!/usr/bin/env bash
# Create (or verify) the mmlocal virtual environment in <repo>/.venv.
#
#   bash tools/setup_env.sh            # idempotent: a complete env is detected in seconds
#   MMLOCAL_VENV=/path bash tools/setup_env.sh
#   MMLOCAL_FORCE_SETUP=1 bash tools/setup_env.sh   # re-run every install step
#
# The stack (see requirements/*.txt, pinned by requirements/constraints.txt):
#   torch 2.14.1 + torchvision 0.29.1, mmcv 2.1.0 built from the PyPI sdist WITH
#   compiled ops, mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2, pycocotools,
#   pytest, and mmlocal itself in editable mode.
#
# mmcv 2.1.0 ships only an sdist. It is compiled once per machine (~12 min on
# 2 cores); pip keeps the built wheel in its cache and later venvs reuse it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMLOCAL_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
CONSTRAINTS="$REPO/requirements/constraints.txt"
STAMP="$VENV/.mmlocal-env-stamp"

log() { echo "[setup_env] $*" >&2; }

fingerprint() {
    cat "$REPO"/requirements/*.txt "$REPO/setup.py" "$REPO/tools/setup_env.sh" | sha256sum | cut -d' ' -f1
}

has_mmcv_ops() {
    # cheap check first (file exists), then a real import of a compiled op
    compgen -G "$VENV/lib/python3*/site-packages/mmcv/_ext*.so" > /dev/null || return 1
    "$PY" - <<'PYEOF' > /dev/null 2>&1
from mmcv.ops import nms  # noqa: F401  (fails without the compiled _ext)
PYEOF
}

if [[ -z "${MMLOCAL_FORCE_SETUP:-}" && -x "$PY" && -f "$STAMP" ]] \
   && [[ "$(cat "$STAMP")" == "$(fingerprint)" ]] \
   && compgen -G "$VENV/lib/python3*/site-packages/mmcv/_ext*.so" > /dev/null; then
    log "environment at $VENV is complete"
    exit 0
fi

START=$(date +%s)
PYTHON_BIN="${PYTHON:-python3}"
if [[ -x "$PY" ]] && ! "$PY" -m pip --version > /dev/null 2>&1; then
    # an interrupted `python -m venv` leaves a python without pip
    log "venv at $VENV has no pip (interrupted creation?): recreating it"
    "$PYTHON_BIN" -m venv --clear "$VENV"
elif [[ ! -x "$PY" ]]; then
    log "creating venv at $VENV with $($PYTHON_BIN --version)"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

log "step 1/4: torch, torchvision and build tools"
"${PIP[@]}" -r "$REPO/requirements/build.txt"

log "step 2/4: mmcv 2.1.0 with compiled ops"
if has_mmcv_ops; then
    log "mmcv ops already present"
else
    # mmcv's setup.py hard-codes -std=c++17 as the last flag, but torch >= 2.10
    # headers require C++20. torch's ninja build calls $CXX, so a wrapper that
    # rewrites the flag is the least invasive fix.
    WRAP_DIR="$(mktemp -d)"
    trap 'rm -rf "$WRAP_DIR"' EXIT
    REAL_CXX="$(command -v "${CXX:-g++}")"
    cat > "$WRAP_DIR/cxx20" <<WRAPEOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    if [[ "\$a" == "-std=c++17" || "\$a" == "-std=c++14" ]]; then a="-std=c++20"; fi
    args+=("\$a")
done
exec "$REAL_CXX" "\${args[@]}"
WRAPEOF
    chmod +x "$WRAP_DIR/cxx20"
    "$PY" -m pip uninstall -y mmcv mmcv-lite > /dev/null 2>&1 || true
    log "building mmcv (first build on a machine takes ~12 min; later ones reuse pip's wheel cache)"
    CXX="$WRAP_DIR/cxx20" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${PIP[@]}" --no-build-isolation -r "$REPO/requirements/mminstall.txt"
    if ! has_mmcv_ops; then
        log "ERROR: mmcv was installed without its compiled ops (mmcv._ext)."
        log "       A wheel without ops may be in pip's cache: run 'pip cache remove mmcv' and retry."
        exit 1
    fi
fi

log "step 3/4: mmengine, mmdet, mmsegmentation, pycocotools, pytest"
"${PIP[@]}" -r "$REPO/requirements/runtime.txt" -r "$REPO/requirements/tests.txt"

log "step 4/4: mmlocal (editable)"
"${PIP[@]}" --no-build-isolation --no-deps -e "$REPO"

"$PY" - <<'PYEOF'
import mmcv, mmdet, mmseg, mmengine, torch
from mmcv.ops import nms  # noqa: F401
import mmlocal
print(f'[setup_env] torch {torch.__version__}, mmcv {mmcv.__version__} (ops), mmengine '
      f'{mmengine.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, '
      f'mmlocal {mmlocal.__version__}')
PYEOF
fingerprint > "$STAMP"
log "done in $(( $(date +%s) - START )) s"
