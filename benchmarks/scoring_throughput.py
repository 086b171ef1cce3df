"""Throughput of the plugin's scoring pass against a plain forward loop, on a bench task's model and pool.

The scoring pass is what informed strategies pay per example they rescore: a forward-only pass (eval mode,
``no_grad``) through the plugin's own loader (the pool rows at the scoring batch size, fetched a batch at a time
from a ``TensorDataset``, else example by example through a ``Subset``),
with the closed-form signals (loss, last-layer gradient norm, embedding) computed from the head's input and
output and copied to the CPU. The baseline is ``model(x)`` over the same examples as contiguous tensor slices
under ``torch.inference_mode()``: no loader, no signals. Each is the median of ``--repeats`` passes after one
untimed pass, interleaved.

On a GPU (``--device cuda``) the model sits on the device and the pool stays in host memory, as in training:
both passes copy each batch to the device (the baseline slices pinned host tensors, the honest best case), and
each timed pass ends with a device synchronisation. ``--precision bf16-mixed`` runs both under bf16 autocast,
as Lightning's precision plugin does for the callback's scoring pass.

    python benchmarks/scoring_throughput.py                       # fashion-mnist, 20,000 examples
    python benchmarks/scoring_throughput.py --task tweets --batch-sizes 128,1024
    python benchmarks/scoring_throughput.py --device cuda --precision bf16-mixed --batch-sizes 512,2048,8192

Writes ``benchmarks/results/scoring_throughput.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, Subset

from grace_lightning.bench.tasks import TaskSize, get_task
from grace_lightning.scoring import Measurements, rows_of
from grace_lightning.signals.capture import SignalExtractor, inference_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scoring_throughput.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.precision == "bf16-mixed":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    task = get_task(args.task)
    data = task.make_data(TaskSize(args.examples, 100, 1), seed=0)
    model = task.build_model(data, seed=0).to(device)
    like = DataLoader(data.train)  # the training loader's dataset and collate, as the callback sees them
    pool = rows_of(data.train, torch.arange(len(data.train)), like.collate_fn)  # what the callback's pass reads
    # The model's input for the baseline: a TensorDataset's first tensor, or the LM tasks' token ids.
    inputs = data.train.tensors[0] if hasattr(data.train, "tensors") else data.train.ids
    inputs = inputs.pin_memory() if device.type == "cuda" else inputs
    sample = next(iter(DataLoader(Subset(data.train, range(4)), batch_size=4)))
    extractor = SignalExtractor.for_module(model, move_data_to_device(sample, device))

    def scoring(batch_size: int) -> float:
        synchronize()
        began = time.perf_counter()
        with inference_forward(model, autocast):
            for batch in Measurements(None, batch_size, 0).loader(pool, like):
                extractor.score_batch(move_data_to_device(batch, device)).detach_cpu()
        synchronize()
        return time.perf_counter() - began

    def plain(batch_size: int) -> float:
        synchronize()
        began = time.perf_counter()
        model.eval()
        with torch.inference_mode(), autocast():
            for start in range(0, inputs.shape[0], batch_size):
                model(inputs[start : start + batch_size].to(device, non_blocking=True))
        synchronize()
        return time.perf_counter() - began

    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        scoring(batch_size), plain(batch_size)  # untimed: first-call setup
        times = {"scoring": [], "plain": []}
        for _ in range(args.repeats):
            times["scoring"].append(scoring(batch_size))
            times["plain"].append(plain(batch_size))
        n = len(data.train)
        row = {
            "batch_size": batch_size,
            "scoring_examples_per_s": n / statistics.median(times["scoring"]),
            "plain_examples_per_s": n / statistics.median(times["plain"]),
        }
        row["scoring_over_plain"] = row["plain_examples_per_s"] / row["scoring_examples_per_s"]
        rows.append(row)
        print(f"batch {batch_size:>5}: scoring pass {row['scoring_examples_per_s']:,.0f} ex/s, plain model(x) "
              f"{row['plain_examples_per_s']:,.0f} ex/s ({row['scoring_over_plain']:.2f}x the time)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "task": args.task, "examples": len(data.train), "repeats": args.repeats, "rows": rows,
        "device": args.device, "precision": args.precision,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
