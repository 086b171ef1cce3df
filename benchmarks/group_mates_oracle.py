"""Does Group-MATES' oracle rank lm-mixture's Shakespeare chunks first, and can its influence model learn it?

On ``lm-mixture-minilm`` Group-MATES trains 80% off-target (the pool's share) although its embeddings, from a
pretrained sentence encoder, separate Shakespeare well (AUC 0.91, ``lm_mixture_signals.py``). Its selection
rests on an oracle: one optimizer step on a single chunk from a snapshot of the live model and optimizer, the
reference-set loss change after it as the chunk's label (lower is better). This script trains the task's model
as a bench run's first epoch does (a random ``--fraction`` of the pool, AdamW, constant learning rate), then
measures the oracle label of ``--probes`` random pool chunks under three step rules:

* ``adamw_live``: the live AdamW and its state (what ``group_mates`` probes with): the update is mostly the
  optimizer's momentum (``beta1 = 0.9``), the same for every chunk;
* ``adamw_fresh``: AdamW from an empty state (a sign-like step along the chunk's own gradient);
* ``sgd``: a plain gradient step at the task's learning rate (its first-order change is the chunk's
  gradient alignment with the reference set, up to ``-lr``).

Reported per rule: the AUC with which a lower label ranks Shakespeare above the other chunks, the labels'
spread across chunks against their common mean, the share of their variance a chunk's own gradient explains
(the correlation with ``sgd``'s labels, squared), and the AUC over the whole pool of a ridge model fitted from
the chunks' MiniLM embeddings (in the signal store's space) to the labels: what a linear influence model, as
Group-MATES' ``w · h``, learns from that many labels.

Then, for the live-AdamW labels (what the strategy probes with), which part of the strategy's selection keeps it
off target: the Shakespeare share of the budget (10% and 30% of the pool) picked from the ridge's pool scores,
fitted on the first 128 probed chunks (what one in-loop refresh absorbs) and on all of them, by

* ``top_k``: the lowest predicted influences (no relational term: MATES' individual selection);
* ``greedy``: Group-MATES' relational greedy (``greedy_group_selection``, ``alpha = temp = 1`` as the released
  code) over the whole pool as one cluster (``clusters=1``);
* ``greedy_quotas``: the same greedy within the default k-means clusters, each given its quota
  (``cluster_budgets``), as the strategy runs by default.

    python benchmarks/group_mates_oracle.py           # seeds 0,1,2; about two minutes a seed on 2 cores

Writes ``benchmarks/results/group_mates_oracle.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import auc, encoder_view, warm_arguments, warm_model, write_report  # noqa: E402

from grace_lightning.probes import ModelSnapshot  # noqa: E402
from grace_lightning.strategies.group_mates import (  # noqa: E402
    clustered_group_selection,
    default_clusters,
    greedy_group_selection,
)

RULES = ("adamw_live", "adamw_fresh", "sgd")
LABEL_COUNTS = (128, 512)
FRACTIONS = (0.1, 0.3)


def _loss(model, batch) -> torch.Tensor:
    return model.per_example_loss(batch).mean()


def _oracle_labels(model, optimizer, data, chunks: list[int], rule: str) -> np.ndarray:
    """Reference-loss change after one ``rule`` step on each chunk alone, from the same snapshot."""
    reference = {"input_ids": data.reference.ids}  # the task's items are {"input_ids": row} dicts
    snapshot = ModelSnapshot(model, [optimizer])
    with torch.no_grad():
        before = float(_loss(model.eval(), reference))
    labels = []
    for i in chunks:
        model.train()
        model.zero_grad(set_to_none=True)
        if rule == "adamw_fresh":
            optimizer.state.clear()
        _loss(model, {"input_ids": data.train.ids[i : i + 1]}).backward()
        if rule == "sgd":
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-model.lr)
        else:
            optimizer.step()
        with torch.no_grad():
            labels.append(float(_loss(model.eval(), reference)) - before)
        snapshot.restore()
    return np.asarray(labels)


def _ridge_pool_scores(rows: np.ndarray, labels: np.ndarray, pool_rows: np.ndarray, l2: float) -> np.ndarray:
    """A linear model fitted to the z-scored labels, as Group-MATES' individual term ``w · h``, on the pool."""
    y = (labels - labels.mean()) / (labels.std() or 1.0)
    w = np.linalg.solve(rows.T @ rows / len(y) + l2 * np.eye(rows.shape[1]), rows.T @ y / len(y))
    return pool_rows @ w


def _picks(method: str, rows: np.ndarray, scores: np.ndarray, budget: int, seed: int) -> np.ndarray:
    if method == "top_k":
        return np.argsort(scores, kind="stable")[:budget]
    if method == "greedy":
        return greedy_group_selection(rows, scores, budget)
    return clustered_group_selection(rows, scores, budget, default_clusters(rows.shape[0], budget), seed)[0]


def selection_shares(pool_rows, chunks, labels, target, l2: float, seed: int) -> dict:
    """Shakespeare share of each selection method's picks, per label count and budget."""
    out: dict = {}
    for count in LABEL_COUNTS:
        used = min(count, len(chunks))
        scores = _ridge_pool_scores(pool_rows[chunks[:used]], labels[:used], pool_rows, l2)
        for fraction in FRACTIONS:
            budget = int(round(fraction * pool_rows.shape[0]))
            for method in ("top_k", "greedy", "greedy_quotas"):
                picks = _picks(method, pool_rows, scores, budget, seed)
                out[f"{method}@{fraction}/{used}"] = float(target[picks].mean())
    return out


def measure_seed(seed: int, fraction: float, epochs: int, probes: int, l2: float) -> dict:
    data, model, trainer, _ = warm_model(seed, fraction, epochs)
    optimizer = trainer.optimizers[0]
    target = ~data.marked.numpy()
    generator = torch.Generator().manual_seed(seed + 1000)
    chunks = torch.randperm(len(data.train), generator=generator)[:probes].tolist()
    pool_rows = encoder_view(data, seed)[0].double().numpy()
    labels = {rule: _oracle_labels(model, optimizer, data, chunks, rule) for rule in RULES}
    on_target = target[chunks]
    result: dict = {"seed": seed, "probed": len(chunks), "probed_target_share": float(on_target.mean()), "rules": {}}
    for rule, y in labels.items():
        result["rules"][rule] = {
            "auc": auc(-y, on_target),  # lower label = larger drop of the reference loss = better
            "mean": float(y.mean()),
            "spread": float(y.std()),
            "own_gradient_r2": float(np.corrcoef(y, labels["sgd"])[0, 1] ** 2),
            "ridge_pool_auc": auc(-_ridge_pool_scores(pool_rows[chunks], y, pool_rows, l2), target),
        }
    result["selection_target_share"] = selection_shares(pool_rows, chunks, labels["adamw_live"], target, l2, seed)
    return result


def main() -> None:
    parser = warm_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--probes", type=int, default=512, help="chunks probed (group_mates' buffer holds 512)")
    parser.add_argument("--l2", type=float, default=1e-2, help="ridge penalty (group_mates' default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "group_mates_oracle.json"))
    args = parser.parse_args()
    runs = [measure_seed(int(s), args.fraction, args.epochs, args.probes, args.l2) for s in args.seeds.split(",")]
    command = (
        f"python benchmarks/group_mates_oracle.py --seeds {args.seeds} --fraction {args.fraction} "
        f"--epochs {args.epochs} --probes {args.probes} --l2 {args.l2}"
    )
    write_report(args.out, command, {"runs": runs})
    print(f"{'rule':<13}{'AUC':>7}{'mean':>11}{'spread':>11}{'own grad r2':>13}{'ridge AUC':>11}")
    for rule in RULES:
        cells = {k: np.mean([r["rules"][rule][k] for r in runs]) for k in runs[0]["rules"][rule]}
        print(f"{rule:<13}{cells['auc']:>7.3f}{cells['mean']:>11.2e}{cells['spread']:>11.2e}"
              f"{cells['own_gradient_r2']:>13.3f}{cells['ridge_pool_auc']:>11.3f}")
    print("Shakespeare share of the picks (live-AdamW labels; the pool: 0.2), mean over seeds:")
    print(f"{'labels':>7}{'budget':>8}" + "".join(f"{m:>15}" for m in ("top_k", "greedy", "greedy_quotas")))
    for count in LABEL_COUNTS:
        used = min(count, args.probes)
        for fraction in FRACTIONS:
            cells = [np.mean([r["selection_target_share"][f"{m}@{fraction}/{used}"] for r in runs])
                     for m in ("top_k", "greedy", "greedy_quotas")]
            print(f"{used:>7}{fraction:>8}" + "".join(f"{c:>15.3f}" for c in cells))
    print(f"probed Shakespeare share {np.mean([r['probed_target_share'] for r in runs]):.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
