#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what bench/gpu_check.sh needs and the GPU machine lacks: deepspeed (built
# here as a pure-Python wheel: PyPI has only its source), webdataset, wids and their missing deps, for that
# machine's Python 3.12 (mlflow is not needed: the check trains with tracking.enabled=false, and the trainer
# imports mlflow only when tracking is on). Run here (pip reaches the registry), then carry .whl (< 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
# pure-Python packages (py3-none-any): one download serves any Python
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl \
  hjson webdataset==1.0.2 wids==0.1.11 braceexpand annotated-types typing-inspection
# compiled packages, for CPython 3.12 on manylinux x86_64
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5
du -sh .whl
