#!/usr/bin/env bash
# Pack the Python packages that the lent GPU machines lack into .whl/gpusite.tar.xz, for bench/gpu_check.sh.
#
#     bash bench/gpu_site.sh          # here, with the package registries; then carry .whl/gpusite.tar.xz to the device
#
# The device image (see the device tool's KINDS.md) has Python 3.12 with torch, lightning, torchmetrics, pyarrow,
# numpy, pandas, matplotlib, pytest and hypothesis, but not mlflow, polars, jsonargparse or submitit, and it cannot
# fetch. Their wheels with every dependency the image lacks come to ~75 MB and a run carries at most 64 MiB, so the
# wheels are unpacked (a site-packages layout, importable from PYTHONPATH), stripped of bytecode and the MLflow UI's
# JavaScript, and compressed with xz: ~43 MiB. mlflow-skinny with SQLAlchemy and Alembic is the tracking client and
# the SQLite store that the GPU tests use (no server runs there). Packages the image already has are left out, so
# that its versions stay in force. Takes ~3 minutes on 2 cores (xz -9e).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q "${PLAT[@]}" -d "$TMP/wh" mlflow-skinny==3.17.2 sqlalchemy alembic polars==2.1.0 \
    'jsonargparse[signatures]==4.53.0' submitit==1.5.4
# in the image already (KINDS.md "Python packages already there"): keep its versions
for p in packaging typing_extensions pyyaml certifi idna urllib3 requests charset_normalizer markupsafe anyio h11 zipp \
         cloudpickle click; do rm -f "$TMP/wh/$p"-*.whl; done
python3 -m pip install -q --target "$TMP/site" --no-deps "${PLAT[@]}" "$TMP"/wh/*.whl
find "$TMP/site" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$TMP/site/mlflow/server/js"
mkdir -p "$ROOT/.whl"
tar -C "$TMP/site" -cf - . | xz -9e -T0 > "$ROOT/.whl/gpusite.tar.xz.tmp"
mv "$ROOT/.whl/gpusite.tar.xz.tmp" "$ROOT/.whl/gpusite.tar.xz"
ls -l "$ROOT/.whl/gpusite.tar.xz"
