#!/bin/sh
# Prepare what a device lease needs to train testbed runs with reports/v5/gpu_train.py. The GPU
# image has no diffusers, so a trimmed diffusers wheel travels as .whl/site.zip; the data and the
# tokenizer come from the bundled model itself (its testbed/ folder holds the v5 data set's
# images.npz and manifest.json), so the tree plus the carry stays under the 64 MiB a call may take.
# Usage: sh reports/v5/gpu_prepare.sh   (from the repository root)
# Then one device call with carry [".whl"], e.g. the filtered v5 runs:
#   mkdir -p /tmp/site && python3 -m zipfile -e .whl/site.zip /tmp/site &&
#   export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 &&
#   python3 reports/v5/gpu_train.py $OUT 480 memfree/testbed/model/tokenizer
#       v5f4:memfree/testbed/model/testbed:4 v5f3:memfree/testbed/model/testbed:3
# A lone run takes about 12 min on an H200; three side by side about 1.4 times that.
set -e
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d /tmp/wheels diffusers==0.42.1 importlib_metadata==10.2.0
.venv/bin/python - <<'PY'
import glob, zipfile
# memfree imports no diffusers pipeline: every pipelines/ subpackage goes, its top-level modules stay.
with zipfile.ZipFile(".whl/site.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for wheel in sorted(glob.glob("/tmp/wheels/diffusers-0.42.1-*.whl") + glob.glob("/tmp/wheels/importlib_metadata-10.2.0-*.whl")):
        with zipfile.ZipFile(wheel) as w:
            for info in w.infolist():
                parts = info.filename.split("/")
                if len(parts) > 3 and parts[:2] == ["diffusers", "pipelines"]:
                    continue
                out.writestr(info, w.read(info))
PY
echo "tree $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + carry $(du -b .whl/site.zip | cut -f1) bytes (limit 67108864)"
