#!/usr/bin/env bash
# The GPU proof's one entry (bench/gpu/README.md): the repo on the path, then bench/gpu/run.py
# (it installs the carried wheels, runs the timed steps and writes the report into $OUT).
#   bash bench/gpu/run.sh             # on the lent GPU machine
#   bash bench/gpu/run.sh --dry-run   # the same steps at tiny sizes, here
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu/run.py "$@"
