#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then run the quick benchmark (results in bench_out/quick).
# Extra arguments go to the benchmark, e.g. `bash scripts/demo.sh --seeds 0,1,2`.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup.sh"
python -m grace_lightning.bench --quick --out bench_out/quick "$@"
