#!/usr/bin/env bash
# Set up ./.venv if needed, then run the tests. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sampler`.
# Fails when pytest fails, and also when it collected no test at all (pytest's exit code 5).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
status=0
python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; failing" >&2
fi
exit "$status"
