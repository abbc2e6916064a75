#!/usr/bin/env bash
# The wheels bench/gpu_two_processes.py needs on the lent GPU machine (Python 3.12, no pydantic there),
# at the versions this project's venv runs, into .whl/ (git-ignored locally by .git/info/exclude).
# Carry `.whl` with the device call and start its command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(version "$name")"
done
ls -l .whl
