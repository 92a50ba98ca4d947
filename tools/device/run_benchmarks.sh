#!/usr/bin/env bash
# One device call: install the carried OpenMMLab stack (mmcv with a PyTorch
# stand-in for its compiled ops), then the issue #4 / #5 benchmarks on CUDA,
# the demo mAP table and the CUDA-only tests. Every step is bounded by
# `timeout` and writes its own files to $OUT, so a failure costs one step.
#   bash tools/device/run_benchmarks.sh          # on the GPU machine (after prepare_stack.sh)
#   LOCAL=1 bash tools/device/run_benchmarks.sh  # CPU dry run, tiny settings
#   STEPS=AC DEMO_NAMES="hpff mlaan" bash ...    # only some steps / demo runs
#   STEPS=ABDF bash ...             # F (batch-8 regime check) runs only when named
#   STEPS=ABDFG BUDGET_S=540 bash ...  # G (torch.compile on/off) only when named,
#                                   # in what is left of BUDGET_S seconds
#   FAMILY_OPTS="--cfg-options model.nan_guard_check=module" STEPS=AB bash ...
#                                   # family tables with one guard sync per module
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT"
T0=$(date +%s)
want() { [[ -z "${STEPS:-}" || "$STEPS" == *$1* ]]; }
L=/tmp/devlogs; mkdir -p $L
pack() { tar czf "$OUT/logs.tgz" -C /tmp devlogs 2>/dev/null; }
stamp() { pack; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# cap N: N seconds, or less so that the script ends within BUDGET_S (the
# device call's limit) with 20 s to spare; a capped step keeps its JSON so far
cap() { local left=$(( ${BUDGET_S:-100000} - ($(date +%s) - T0) - 20 ))
        (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo $1; }

if [[ -n "${LOCAL:-}" ]]; then
    PY=.venv/bin/python
    export PYTHONPATH=$PWD/.devpkgs/site:$PWD
    DET="--input-shape 1 3 128 160 --iters 1 --warmup 0 --device cpu"
    SEG="--input-shape 2 3 128 128 --iters 1 --warmup 0 --device cpu"
    DEMO_ITERS=2; TO=1; REPL="--iters 1 --warmup 0 --device cpu --input-shape 2 3 128 128"
    COMPILE=${COMPILE:-"dict(backend='aot_eager')"}; CWARM="--iters 1 --warmup 1"
    F8=${F8:-"--input-shape 2 3 128 160 --iters 1 --warmup 0 --device cpu"}
else
    PY=python3
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .devpkgs/whl/*.whl || exit 3
    cp -r .devpkgs/site/. /tmp/site/
    export PYTHONPATH=/tmp/site:$PWD
    DET="--input-shape 2 3 800 1333 --iters 6 --warmup 2 --device cuda"
    SEG="--input-shape 2 3 512 1024 --iters 6 --warmup 2 --device cuda"
    DEMO_ITERS=300; TO=1; REPL="--iters 6 --warmup 2 --device cuda"
    COMPILE=${COMPILE:-True}; CWARM="--iters 6 --warmup 4"
fi
check() {
    $PY -c "import torch, numpy, mmcv, mmengine, mmdet, mmseg
import mmdet.models, mmseg.models, mmlocal, mmlocal.models
print('torch', torch.__version__, 'numpy', numpy.__version__, 'mmcv', mmcv.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
}
stamp setup
if ! check 2>&1 | tee "$OUT/env.txt"; then
    echo 'import failed: retrying with the carried numpy 2.4.6'
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .devpkgs/np/*.whl
    check 2>&1 | tee -a "$OUT/env.txt" || exit 4
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/env.txt"

C=configs/local
H=/tmp/hpff_nopff_retinanet.py
printf "_base_ = '%s'\nmodel = dict(aux=dict(patch_grid=1))\n" \
    "$PWD/$C/hpff_retinanet_r50_fpn_k4_8xb2-1x_coco.py" > $H
H2=/tmp/hpff_nopff_deeplabv3.py
printf "_base_ = '%s'\nmodel = dict(aux=dict(patch_grid=1))\n" \
    "$PWD/$C/hpff_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py" > $H2
# the same families with activation checkpointing inside the aux nets
withcp() {  # withcp CONFIG -> path of a copy with model.aux.with_cp=True
    local out=/tmp/cp_$(basename "$1")
    printf "_base_ = '%s'\nmodel = dict(aux=dict(with_cp=True))\n" "$PWD/$1" > "$out"
    echo "$out"
}
if want A; then
stamp 'A: RetinaNet K4 families'
timeout $(cap $((TO * 170))) $PY tools/analysis/benchmark_local_methods.py \
    infopro=$C/infopro_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    man=$C/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    manpp=$C/manpp_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    mlaan=$C/mlaan_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    hpff=$C/hpff_retinanet_r50_fpn_k4_8xb2-1x_coco.py hpff-nopff=$H \
    auglocal=$C/auglocal_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    dgl=$C/dgl_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    man-cp=$(withcp $C/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py) \
    mlaan-cp=$(withcp $C/mlaan_retinanet_r50_fpn_k4_8xb2-1x_coco.py) \
    mlaan-cpb=$C/mlaan-cp_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    $DET ${FAMILY_OPTS:-} --json "$OUT/families_retinanet.json" > "$L/families_retinanet.log" 2>&1
tail -n 16 "$L/families_retinanet.log"

fi
if want B; then
stamp 'B: DeepLabV3 K2 families'
timeout $(cap $((TO * 170))) $PY tools/analysis/benchmark_local_methods.py \
    infopro=$C/infopro_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    man=$C/man_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    manpp=$C/manpp_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    mlaan=$C/mlaan_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    hpff=$C/hpff_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py hpff-nopff=$H2 \
    auglocal=$C/auglocal_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    dgl=$C/dgl_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    man-cp=$(withcp $C/man_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py) \
    mlaan-cp=$(withcp $C/mlaan_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py) \
    man-cpb=$C/man-cp_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    manpp-cpb=$C/manpp-cp_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    mlaan-cpb=$C/mlaan-cp_deeplabv3_r50-d8_k2_4xb2-40k_cityscapes-512x1024.py \
    $SEG ${FAMILY_OPTS:-} --json "$OUT/families_deeplabv3.json" > "$L/families_deeplabv3.log" 2>&1
tail -n 16 "$L/families_deeplabv3.log"

fi
if want C; then
stamp 'C: demo mAP (8 runs in parallel)'
D=configs/demo
W=/tmp/demo_map
runs="e2e=$D/retinanet_r18_fpn_1xb4-300i_demo-trees.py
dgl=$D/dgl_retinanet_r18_fpn_k3_1xb4-300i_demo-trees.py
infopro=$D/infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py
man=$D/man_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py
manpp=$D/manpp_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py
hpff=$D/hpff_retinanet_r18_fpn_k4_1xb4-300i_demo-trees.py
mlaan=$D/mlaan_retinanet_r18_fpn_k4_1xb4-300i_demo-trees.py
auglocal=$D/auglocal_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py"
if [[ -n "${DEMO_NAMES:-}" ]]; then
    runs=$(for r in $runs; do [[ " $DEMO_NAMES " == *" ${r%%=*} "* ]] && echo $r; done)
fi
for r in $runs; do
    timeout $((TO * ${DEMO_TIMEOUT:-170})) $PY tools/analysis/demo_map.py "$r" --iters $DEMO_ITERS \
        --work-dir $W > "$W.${r%%=*}.log" 2>&1 &
done
wait
timeout 60 $PY tools/analysis/demo_map.py $runs --iters $DEMO_ITERS --resume \
    --work-dir $W --json "$OUT/demo_map.json" 2>&1 | tee "$L/demo_map.log"
for r in $runs; do grep -h -i -m3 "error\|Traceback" "$W.${r%%=*}.log"; done
cp $W.*.log $L/ 2>/dev/null; for d in $W/*/; do cp $d*/*.log $L/ 2>/dev/null; done

fi
if want D; then
stamp 'D: RepL'
R=configs/repl
timeout $(cap $((TO * 200))) $PY tools/analysis/benchmark_repl.py \
    $R/repl_retinanet_r50_fpn_i2_8xb2-1x_coco.py $R/repl_retinanet_r50_fpn_i3_8xb2-1x_coco.py \
    $R/repl_faster-rcnn_r50_fpn_i2_8xb2-1x_coco.py $R/repl_faster-rcnn_r50_fpn_i3_8xb2-1x_coco.py \
    $R/repl_deeplabv3_r50-d8_i2_4xb2-40k_cityscapes-512x1024.py $R/repl_deeplabv3_r50-d8_i3_4xb2-40k_cityscapes-512x1024.py \
    $R/repl_upernet_vit-b16_mln_i2_8xb2-80k_cityscapes-512x1024.py $R/repl_upernet_vit-b16_mln_i3_8xb2-80k_cityscapes-512x1024.py \
    $REPL --json "$OUT/repl.json" > "$L/repl.log" 2>&1
tail -n 30 "$L/repl.log"

fi
if [[ "${STEPS:-}" == *F* ]]; then  # only when asked for: STEPS=F
# regime check: at 8 images per GPU a step is bound by the device, not by
# launches; do RepL (fewer FLOPs, more kernels) and MAN (more FLOPs and
# kernels) then move towards their FLOP ratios?
stamp 'F: batch 8 (RepL i2/i3, MAN K4; RetinaNet)'
F8=${F8:-"--input-shape 8 3 800 1333 --iters 4 --warmup 1 --device cuda"}
timeout $(cap $((TO * 150))) $PY tools/analysis/benchmark_repl.py \
    configs/repl/repl_retinanet_r50_fpn_i2_8xb2-1x_coco.py configs/repl/repl_retinanet_r50_fpn_i3_8xb2-1x_coco.py \
    $F8 --json "$OUT/repl_b8.json" > "$L/repl_b8.log" 2>&1
tail -n 12 "$L/repl_b8.log"
timeout $(cap $((TO * 150))) $PY tools/analysis/benchmark_local_methods.py \
    man=$C/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py \
    $F8 --json "$OUT/families_b8.json" > "$L/families_b8.log" 2>&1
tail -n 6 "$L/families_b8.log"

fi
if [[ "${STEPS:-}" == *G* ]]; then  # only when asked for: STEPS=G
# torch.compile (CUDA graphs on CUDA) of the aux nets' static part and of
# RepL's batched synthesis, against the same configs eager; the first
# iterations compile, so only in what is left of BUDGET_S
left=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) ))
stamp "G: torch.compile on/off (${left} s left)"
if (( left > 90 )); then
M=$C/man_retinanet_r50_fpn_k4_8xb2-1x_coco.py
printf "_base_ = '%s'\nmodel = dict(aux=dict(compile=%s))\n" "$PWD/$M" "$COMPILE" > /tmp/compile_man.py
timeout $(( left * 11 / 20 )) $PY tools/analysis/benchmark_local_methods.py \
    man=$M man-compile=/tmp/compile_man.py $DET $CWARM \
    --json "$OUT/families_compile.json" > "$L/families_compile.log" 2>&1
tail -n 6 "$L/families_compile.log"
left=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) ))
R2=configs/repl/repl_retinanet_r50_fpn_i2_8xb2-1x_coco.py
printf "_base_ = '%s'\nmodel = dict(backbone=dict(compile_synthesis=%s))\n" "$PWD/$R2" "$COMPILE" > /tmp/compile_repl_i2.py
(( left > 30 )) && timeout $(( left - 15 )) $PY tools/analysis/benchmark_repl.py \
    $R2 /tmp/compile_repl_i2.py $REPL $CWARM \
    --json "$OUT/repl_compile.json" > "$L/repl_compile.log" 2>&1
tail -n 8 "$L/repl_compile.log"
fi

fi
stamp 'E: CUDA tests'
if [[ -z "${LOCAL:-}" ]]; then
    timeout $(cap 150) $PY -m pytest -q -p no:cacheprovider tests/test_memory_meter.py \
        tests/test_aux_compile.py \
        tests/test_repl_batched.py::test_tiled_group_equals_per_class_calls_cuda \
        2>&1 | tail -n 8
fi
stamp done
