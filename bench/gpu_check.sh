#!/usr/bin/env bash
# The GPU check of issue 13: one script, run as is on a fresh machine with one GPU (target: <= 6 minutes on one H100).
#
#     bash bench/gpu_check.sh                 # on the GPU machine, from anywhere inside the repository
#     GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   # dry run on the CPU with tiny sizes (checks the script end to end)
#     GPU_CHECK_STEPS=tests,epoch bash bench/gpu_check.sh   # rerun some steps; the others keep their JSON
#
# Steps (each bounded by `timeout`, 150 + 120 + 60 + 200 s in all, so that one 10-minute device call holds the script;
# a failed or timed-out step is recorded, keeps the rows it measured, and the script goes on):
#   1. environment: a Python that imports torch + recscale's dependencies (see below), versions and device printed
#   2. `pytest -m gpu` (tests/test_gpu.py: bf16/fp16 fits, device cache, the OOM message, diagnostics CUDA == CPU)
#   3. bench/train_bench.py --device cuda: the six Table-1 models at SE 1x and ME 10x, set-batched vs per-set loop
#   4. bench/e2e_bench.py diag: the full diagnostics pass at DCNv2 ME 10x (50,000 x 3,900 RankMe, float64)
#   5. bench/e2e_bench.py epoch: one epoch of a 5M-row synthetic Criteo (synth + prepare outside the timing): device
#      cache bf16 (+ compile), streaming fp32 and bf16, at batch 2048 and larger batches (the best one is stated)
#   6. bench/gpu_report.py: one JSON ($OUT/gpu_check.json) and a Markdown section for BENCHMARKS.md ($OUT/gpu_check.md),
#      with the issue's targets beside the measured values
#
# Assumptions about the machine (nothing about it could be checked when this was written): Linux, Python 3.10+ (3.12
# expected), an NVIDIA driver. Python environment, first that works:
#   a. $PYTHON, ./.venv/bin/python, python3.12, python3 -- if it already imports torch and every dependency;
#   b. a venv ./.venv-gpu made with --system-site-packages (so a preinstalled CUDA torch is kept), into which pip
#      installs the project's dependencies (`pip install -e .[test]`; pip leaves an installed torch that satisfies
#      torch>=2.3 alone); torch itself from PyPI only if no importable torch sees a GPU. Without network access, point
#      RECSCALE_WHEELHOUSE at a directory of wheels (pip install --no-index --find-links).
# The repository's sources always come first (PYTHONPATH), whatever recscale may be installed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SMOKE=${GPU_CHECK_SMOKE:-0}
OUT=${GPU_CHECK_OUT:-$ROOT/bench/out/gpu_check}
mkdir -p "$OUT"
# GPU_CHECK_STEPS picks steps for a rerun (e.g. tests,epoch); a step left out keeps its JSON from the previous run
STEPS=,${GPU_CHECK_STEPS:-tests,train,diag,epoch},
step() { [[ $STEPS == *,$1,* ]]; }
rm -f "$OUT"/env.json
for s in tests:pytest train:train diag:diag epoch:e2e; do step "${s%%:*}" && rm -f "$OUT/${s#*:}.json"; done
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
DEPS='import torch, lightning, torchmetrics, mlflow, polars, pyarrow, jsonargparse, matplotlib, pytest, hypothesis'
# The lent machines cannot fetch packages and lack mlflow, polars, jsonargparse and submitit: bench/gpu_site.sh packs
# those (Python 3.12 wheels, unpacked, xz) into .whl/gpusite.tar.xz here, the run carries it, and it goes on PYTHONPATH.
SITE_TAR=${GPU_CHECK_SITE_TAR:-$ROOT/.whl/gpusite.tar.xz}
if [ -f "$SITE_TAR" ]; then
    SITE=${TMPDIR:-/tmp}/recscale-gpusite
    # tar + xz where they exist (Python's tarfile took 36 s on the H200 machine, 2026-11-27), else Python
    if [ ! -f "$SITE/.complete" ]; then rm -rf "$SITE" && mkdir -p "$SITE" && { tar -xJf "$SITE_TAR" -C "$SITE" \
        2>/dev/null || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$SITE_TAR" "$SITE"; } && touch "$SITE/.complete" || { log "could not unpack $SITE_TAR"; exit 1; }; fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    log "packages from $SITE_TAR on PYTHONPATH"
fi

# ---------------------------------------------------------------- 1. environment
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3.12 python3; do
    if [ -z "$cand" ] || ! command -v "$cand" >/dev/null 2>&1; then continue; fi
    if "$cand" -c "$DEPS" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then
    BASE=$(command -v python3.12 || command -v python3)
    log "no Python with torch + dependencies found; making $ROOT/.venv-gpu from $BASE (--system-site-packages)"
    [ -x "$ROOT/.venv-gpu/bin/python" ] || "$BASE" -m venv --system-site-packages "$ROOT/.venv-gpu" || exit 1
    PY=$ROOT/.venv-gpu/bin/python
    PIP=("$PY" -m pip install -q)
    [ -n "${RECSCALE_WHEELHOUSE:-}" ] && PIP+=(--no-index --find-links "$RECSCALE_WHEELHOUSE")
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        if [ "$SMOKE" = 1 ]; then "${PIP[@]}" torch || exit 1; else
            log "no torch that sees a GPU: installing torch from PyPI"; "${PIP[@]}" torch || exit 1; fi
    fi
    "${PIP[@]}" -e "${ROOT}[test]" || { log "pip install of the dependencies failed (offline? set RECSCALE_WHEELHOUSE)"; exit 1; }
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MLFLOW_TRACKING_URI=sqlite:///$OUT/mlflow.db
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; SLOW=4; else DEVICE=cuda; SLOW=1; fi  # SLOW: timeouts x4 for the CPU dry run
"$PY" - "$OUT/env.json" "$SMOKE" <<'EOF' || exit 1
import datetime, json, platform, sys
import lightning, torch
cuda = torch.cuda.is_available()
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
       "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if cuda else None, "lightning": lightning.__version__,
       "cpu_threads": torch.get_num_threads(), "smoke": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
if not cuda and sys.argv[2] != "1":
    sys.exit("gpu_check: torch sees no CUDA device (set GPU_CHECK_SMOKE=1 for a CPU dry run)")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
log "python $PY, device $DEVICE, results in $OUT"

# ---------------------------------------------------------------- 2. GPU tests
if step tests; then
log "pytest -m gpu"
timeout $((150 * SLOW)) "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
"$PY" - "$OUT" "$rc" <<'EOF'
import json, sys
lines = [l for l in open(f"{sys.argv[1]}/pytest.log").read().splitlines() if l.strip()]
json.dump({"returncode": int(sys.argv[2]), "summary": lines[-1].strip("= ") if lines else "no output"},
          open(f"{sys.argv[1]}/pytest.json", "w"))
EOF
fi

# ---------------------------------------------------------------- 3. set-batched vs per-set loop
if step train; then
log "bench/train_bench.py --device $DEVICE"
if [ "$SMOKE" = 1 ]; then TB=(--models "DNN,DCNv2" --steps 1 --batch-size 256); else TB=(--steps 20 --rounds 2); fi
timeout $((120 * SLOW)) "$PY" bench/train_bench.py --device "$DEVICE" --cells SE1,ME10 "${TB[@]}" --json "$OUT/train.json" \
    || log "train_bench failed or timed out (exit $?)"
fi

# ---------------------------------------------------------------- 4. diagnostics pass
if step diag; then
log "bench/e2e_bench.py diag"
if [ "$SMOKE" = 1 ]; then DG=(--sample-rows 2000 --small-tables --scale 2); else DG=(); fi
timeout $((60 * SLOW)) "$PY" bench/e2e_bench.py diag --device "$DEVICE" "${DG[@]}" --json "$OUT/diag.json" \
    || log "e2e_bench diag failed or timed out (exit $?)"
fi

# ---------------------------------------------------------------- 5. end to end, one epoch
if step epoch; then
log "bench/e2e_bench.py epoch"
if [ "$SMOKE" = 1 ]; then
    E2E=(--rows 5000 --configs "stream-fp32:1024,stream-bf16:1024,cache-bf16:1024,cache-bf16-compile:1024,cache-bf16:4096")
else
    # the target's configuration first: a step cut short by its timeout keeps the configurations already measured
    E2E=(--rows 5000000 --num-workers 6 --configs "cache-bf16:2048,cache-bf16:16384,cache-bf16:65536,stream-fp32:2048,\
stream-bf16:2048,cache-bf16-compile:2048,cache-bf16-compile:65536")
fi
timeout $((${GPU_CHECK_EPOCH_TIMEOUT:-200} * SLOW)) "$PY" bench/e2e_bench.py epoch --device "$DEVICE" "${E2E[@]}" --json "$OUT/e2e.json" \
    || log "e2e_bench epoch failed or timed out (exit $?)"
fi

# ---------------------------------------------------------------- 6. one JSON + the Markdown table
log "report"
"$PY" bench/gpu_report.py "$OUT"
log "done in $(( $(date +%s) - T0 )) s"
