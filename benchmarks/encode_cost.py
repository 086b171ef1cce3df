"""What a task's fixed encoder embeddings cost to compute: the one-time pass the bench leaves out of training seconds.

With ``--task-option embedding=minilm`` a task hands the strategies all-MiniLM-L6-v2's sentence embeddings of its
pool and reference set, computed in ``make_data`` before any fit, so the bench's "train s" does not count them.
This times that computation alone (the tokenised corpus and the encoder loaded first, as a suite's first fit
leaves them), over ``--repeats`` fresh encodings, and reports the median.

    python benchmarks/encode_cost.py                       # minilm-tweets at its default size (2,000 tweets)

Writes ``benchmarks/results/encode_cost.json``. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.tasks import get_task, tweets  # noqa: E402
from grace_lightning.bench.tasks.minilm_tweets import build_encoder, load_tokenizer, model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="minilm-tweets", choices=["minilm-tweets", "tweets"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode_cost.json"))
    args = parser.parse_args()
    task = get_task(args.task, embedding="minilm")
    size = task.sizes["default"]
    get_task(args.task).make_data(size, seed=0)  # tokenise the corpus once, outside the timing
    path = model_path()
    load_tokenizer(path), build_encoder(path)  # warm the loaders, as a suite's earlier fits would
    seconds = []
    for _ in range(args.repeats):
        tweets._ENCODED.clear()  # a fresh encoding each time, not the module's cache
        start = time.perf_counter()
        data = task.make_data(size, seed=0)
        seconds.append(time.perf_counter() - start)
    row = {
        "task": args.task, "pool": len(data.train), "reference": len(data.reference),
        "median_seconds": statistics.median(seconds), "seconds": seconds,
    }
    print(f"{args.task}: encoding {row['pool']} pool and {row['reference']} reference texts took "
          f"{row['median_seconds']:.1f} s (median of {args.repeats})")
    write_report(args.out, " ".join(["python benchmarks/encode_cost.py", *sys.argv[1:]]), {"rows": [row]})


if __name__ == "__main__":
    main()
