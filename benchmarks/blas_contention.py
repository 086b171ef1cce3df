"""Does numpy's multithreaded BLAS slow the strategies' CPU work when it runs beside training?

On one H200 with 16 CPU cores the bench's GIP greedy took about 3 s a refresh on `lm-mixture`
(`benchmarks/results/gpu_check/run3`), where the same greedy at that size takes 0.13-0.16 s on this project's 2-core
machine. The suspect: overlapped selection runs the strategy in a background thread while training runs, and
numpy's OpenBLAS threads busy-wait against torch's on every small product of the greedy loop.

This script times the strategies' CPU kernels at the bench's sizes (GIP's stochastic log-det greedy, Group-MATES'
clustered greedy, GRIP's intra-cluster density), alone and beside a training loop (on the GPU when there is one,
else on the CPU), each in a fresh process with ``OPENBLAS_NUM_THREADS`` unset (numpy's default: one thread a core)
and set to 1.

    python benchmarks/blas_contention.py --out benchmarks/results/blas_contention/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _kernels():
    import numpy as np

    from grace_lightning.strategies.gip import greedy_logdet_stochastic
    from grace_lightning.strategies.grip import local_density
    from grace_lightning.strategies.group_mates import clustered_group_selection, default_clusters

    rng = np.random.default_rng(0)

    def unit(n: int, d: int) -> "np.ndarray":
        x = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    lm, fashion = unit(10_000, 128), unit(59_744, 128)
    scores = rng.normal(size=fashion.shape[0])
    cluster = unit(4_000, 128)
    return {
        "gip greedy, 10k x 128, budget 3k": lambda: greedy_logdet_stochastic(lm, lm[:64].astype(np.float64), 3_000, batch=16),
        "gip greedy, 60k x 128, budget 18k": lambda: greedy_logdet_stochastic(
            fashion, fashion[:256].astype(np.float64), 17_923, batch=16
        ),
        "group_mates clustered greedy, 60k x 128": lambda: clustered_group_selection(
            fashion.astype(np.float64), scores, 17_923, default_clusters(59_744, 17_923), seed=0
        ),
        "grip density, 4k x 128": lambda: local_density(cluster, 10),
    }


def _training(stop: threading.Event) -> None:
    """A small model's training loop: GPU kernels launched from this thread, or CPU products."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(128, 512, device=device)
    while not stop.is_set():
        loss = model(x).logsumexp(dim=1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def child(repeats: int) -> dict:
    kernels = _kernels()
    out = {}
    for beside in (False, True):
        stop = threading.Event()
        worker = threading.Thread(target=_training, args=(stop,), daemon=True) if beside else None
        if worker is not None:
            worker.start()
            time.sleep(1.0)  # past CUDA's start-up
        for name, kernel in kernels.items():
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                kernel()
                times.append(time.perf_counter() - began)
            out[f"{name} | {'beside training' if beside else 'alone'}"] = min(times)
        stop.set()
        if worker is not None:
            worker.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="default,1", help="OPENBLAS_NUM_THREADS values; `default` leaves it unset")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    import torch

    report = {"cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": {}}
    for threads in args.threads.split(","):
        env = dict(os.environ)
        env.pop("OPENBLAS_NUM_THREADS", None)
        if threads != "default":
            env["OPENBLAS_NUM_THREADS"] = threads
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        report["runs"][threads] = seconds
        for name, value in seconds.items():
            print(f"OPENBLAS_NUM_THREADS={threads:8s} {name:60s} {value:7.3f} s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
