"""Can the live model's signals tell lm-mixture's Shakespeare chunks from the rest of the pool?

The reference-directed strategies (``gip``'s queries, ``group_mates``' influence model) see the pool through
the store's embedding: the mean of the byte GPT's head input over a chunk's positions, as unit rows. This
script trains the ``lm-mixture`` task's model the way a bench run's first epoch does (a random ``--fraction``
of the pool, the task's batch size and learning rate, constant schedule), then measures, per seed, how well
each signal ranks the on-target chunks above the others:

* ``cos_raw``: cosine of each chunk's embedding to the mean reference embedding (what GIP's queries measure);
* ``cos_centered``: the same after subtracting the pool's mean embedding (embeddings share a large common
  direction, so raw cosines are crowded near 1);
* ``grad_align``: the inner product of each chunk's last-layer gradient with the reference set's mean
  last-layer gradient (a first-order estimate of how much one step on the chunk lowers the reference loss,
  the quantity Group-MATES' probes measure), in closed form from the head's inputs and softmax errors;
* ``low_loss``: minus the chunk's mean token loss;
* ``minilm``: for comparison, the cosine to the mean reference embedding in the space of a pretrained sentence
  encoder (all-MiniLM-L6-v2, the task's ``embedding=minilm`` option, as ``CoresetCallback(embeddings=...)`` gets
  them); it does not depend on the trained model.

Reported per signal: the AUC of Shakespeare against every other chunk, against the ``shuffled`` source alone
(Shakespeare's bytes permuted: same unigrams, no structure) and against the rest; the Shakespeare share of the
top 10% and 30% of the pool; and the Shakespeare share of GIP's own log-det greedy (its default for a budget
above the embedding width) at 10% of the pool, on raw, centered and MiniLM embeddings (in the signal store's
space: projected to 256 dimensions, unit rows).

    python benchmarks/lm_mixture_signals.py                 # seeds 0,1,2; about 1 minute a seed on 2 cores

Writes ``benchmarks/results/lm_mixture_signals.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from grace_lightning.bench.tasks import TaskSize, get_task
from grace_lightning.bench.tasks.lm_mixture import chunk_embeddings
from grace_lightning.signals import SignalStore
from grace_lightning.strategies.gip import greedy_logdet_stochastic

SIGNAL_NAMES = ("cos_raw", "cos_centered", "grad_align", "low_loss", "minilm")


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (Mann-Whitney; float scores rarely tie)."""
    ranks = np.empty(score.size)
    ranks[np.argsort(score, kind="stable")] = np.arange(1, score.size + 1)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def write_report(out: str, command: str, payload: dict) -> None:
    """Write ``payload`` to ``out`` as JSON with the command that made it, the commit and the machine."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"command": command, "commit": commit, "machine": machine, **payload}, indent=1))


def encoder_view(data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's and the reference set's all-MiniLM-L6-v2 embeddings as the callback stores them (projected to
    256 dimensions, unit rows; the pool's in the store's fp16), as ``lm-mixture-minilm`` hands them over."""
    store = SignalStore(len(data.train), max_embedding_dim=256, seed=seed)
    store.fix_embedding(chunk_embeddings(data.train.ids))
    return store.embedding, store.to_store_space(chunk_embeddings(data.reference.ids))


def task_views(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`encoder_view` of seed ``seed``'s lm-mixture data (pool rows float32, reference float64), and the
    pool's Shakespeare mask; no model is trained."""
    data = get_task("lm-mixture").make_data(TaskSize(None, None, 1), seed)
    pool, reference = encoder_view(data, seed)
    return pool.float().numpy(), reference.double().numpy(), ~data.marked.numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@torch.inference_mode()
def _pass(model, dataset, collate, grad_ref=None):
    """Per chunk: mean head input (embedding), mean token loss, and the gradient alignment with ``grad_ref``.

    With ``grad_ref=None`` also returns the set's mean last-layer gradient ``(V, d)``.
    """
    weight = model.lm.lm_head.weight
    embeddings, losses, aligns, grad_sum = [], [], [], None
    for batch in DataLoader(dataset, batch_size=256, collate_fn=collate):
        ids = batch["input_ids"]
        h = model.lm.transformer(input_ids=ids).last_hidden_state[:, :-1]  # positions that predict a byte
        logits = h @ weight.T
        targets = ids[:, 1:]
        losses.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1))
        embeddings.append(h.mean(1))
        # d(mean token loss)/d(head weight) = sum_t e_t h_t^T / T with e_t = softmax - onehot.
        error = logits.softmax(-1)
        error.scatter_add_(-1, targets[..., None], -torch.ones_like(targets[..., None], dtype=error.dtype))
        error /= h.shape[1]
        if grad_ref is None:
            part = torch.einsum("btv,btd->vd", error, h)
            grad_sum = part if grad_sum is None else grad_sum + part
        else:
            aligns.append(torch.einsum("btv,vd,btd->b", error, grad_ref, h))
    emb = torch.cat(embeddings).double().numpy()
    loss = torch.cat(losses).double().numpy()
    if grad_ref is None:
        return emb, loss, grad_sum / len(dataset)
    return emb, loss, torch.cat(aligns).double().numpy()


def warm_model(seed: int, fraction: float, epochs: int):
    """The task's data and model after ``epochs`` on a random ``fraction`` of the pool (what a bench run has
    trained at its first informed refresh), with the trainer that holds its optimizer, and the seconds taken."""
    task = get_task("lm-mixture")
    data = task.make_data(TaskSize(None, None, epochs), seed)
    model = task.build_model(data, seed)
    model.lr_schedule = "constant"
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(data.train), generator=generator)[: int(fraction * len(data.train))].tolist()
    loader = DataLoader(
        Subset(data.train, subset), batch_size=task.batch_size, shuffle=True, collate_fn=data.collate_fn,
        generator=generator,
    )
    began = time.perf_counter()
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )
    trainer.fit(model, loader)
    return data, model, trainer, time.perf_counter() - began


def warm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--seeds``, and ``--fraction`` and ``--epochs`` of :func:`warm_model`."""
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fraction", type=float, default=0.3, help="random share of the pool trained on first")
    parser.add_argument("--epochs", type=int, default=1)
    return parser


def measure_seed(seed: int, fraction: float, epochs: int) -> dict:
    data, model, _, train_seconds = warm_model(seed, fraction, epochs)
    pool = len(data.train)
    model.eval()
    ref_emb, _, grad_ref = _pass(model, data.reference, data.collate_fn)
    emb, loss, align = _pass(model, data.train, data.collate_fn, grad_ref=grad_ref)

    target = ~data.marked.numpy()
    sources = np.asarray(data.info["sources"])
    names = list(data.info["source_names"])
    shuffled = sources == names.index("shuffled")
    mean = emb.mean(0, keepdims=True)
    raw, centered = _unit(emb), _unit(emb - mean)
    encoded, encoded_ref = (rows.double().numpy() for rows in encoder_view(data, seed))
    scores = {
        "cos_raw": raw @ _unit(_unit(ref_emb).mean(0, keepdims=True))[0],
        "cos_centered": centered @ _unit(_unit(ref_emb - mean).mean(0, keepdims=True))[0],
        "grad_align": align,
        "low_loss": -loss,
        "minilm": encoded @ _unit(encoded_ref.mean(0, keepdims=True))[0],
    }
    result: dict = {"seed": seed, "train_seconds": train_seconds, "signals": {}}
    for name, score in scores.items():
        order = np.argsort(-score, kind="stable")
        not_shuffled = ~shuffled
        result["signals"][name] = {
            "auc_vs_all": auc(score, target),
            "auc_vs_shuffled": auc(score[target | shuffled], target[target | shuffled]),
            "auc_vs_rest": auc(score[not_shuffled], target[not_shuffled]),
            "top10_target_share": float(target[order[: pool // 10]].mean()),
            "top30_target_share": float(target[order[: 3 * pool // 10]].mean()),
            "mean_by_source": {names[s]: float(score[sources == s].mean()) for s in np.unique(sources)},
        }
    budget = pool // 10
    result["gip_logdet_target_share"] = {}
    views = (
        ("raw", raw, _unit(ref_emb)), ("centered", centered, _unit(ref_emb - mean)), ("minilm", encoded, encoded_ref)
    )
    for label, rows, queries in views:
        picks = greedy_logdet_stochastic(rows.astype(np.float32), queries, budget, seed=seed).picks
        result["gip_logdet_target_share"][label] = float(target[picks].mean())
    result["pool_target_share"] = float(target.mean())
    return result


def main() -> None:
    parser = warm_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_mixture_signals.json"))
    args = parser.parse_args()
    runs = [measure_seed(int(s), args.fraction, args.epochs) for s in args.seeds.split(",")]
    command = f"python benchmarks/lm_mixture_signals.py --seeds {args.seeds} --fraction {args.fraction} --epochs {args.epochs}"
    write_report(args.out, command, {"runs": runs})
    print(f"{'signal':<14}{'AUC all':>9}{'vs shuffled':>13}{'vs rest':>9}{'top 10%':>9}{'top 30%':>9}")
    for name in SIGNAL_NAMES:
        cells = [[r["signals"][name][k] for r in runs] for k in (
            "auc_vs_all", "auc_vs_shuffled", "auc_vs_rest", "top10_target_share", "top30_target_share")]
        print(f"{name:<14}" + "".join(f"{np.mean(c):>9.3f}" if i != 1 else f"{np.mean(c):>13.3f}" for i, c in enumerate(cells)))
    for label in ("raw", "centered", "minilm"):
        print(f"gip log-det greedy at 10% ({label}): Shakespeare share "
              f"{np.mean([r['gip_logdet_target_share'][label] for r in runs]):.3f}")
    print(f"pool Shakespeare share {runs[0]['pool_target_share']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
