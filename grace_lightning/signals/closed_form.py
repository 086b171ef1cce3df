"""Per-example loss and last-layer gradient norms in closed form: pure tensor functions, no backward pass.

For cross-entropy on logits ``z = W h (+ b)`` the gradient of the loss with respect to the logits is
``e = softmax(z) - onehot(y)``, so the gradient with respect to the head's weight is the outer product
``e hᵀ`` and with respect to its bias is ``e``. Its Frobenius norm is therefore ``‖e‖ · sqrt(‖h‖² [+ 1])``
(the rank-one structure of a linear layer's per-example gradient). The factor ``‖e‖`` alone is the EL2N score (Paul et al. 2021), kept as
``error_norm``. For a causal LM the per-sequence gradient is ``Σ_t e_t h_tᵀ`` and its exact
norm comes from two ``T × T`` Gram matrices, never from the ``V × d`` gradient itself (see :func:`causal_lm_signals`).

Everything is computed in float32, whatever the input dtype, because bf16/fp16 softmax residuals
``p - onehot(y)`` lose most of their digits for confident predictions.

Examples that carry no supervision (a sequence whose labels are all ``ignore_index``, a classification
target equal to ``ignore_index``) get ``loss = grad_norm = NaN`` and ``length = 0`` (sequences also get a
NaN embedding): callers must exclude non-finite rows and count them rather than treat them as
zero-importance examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import ExampleSignals

__all__ = ["classification_signals", "causal_lm_signals", "classification_losses", "causal_lm_losses"]

IGNORE_INDEX = -100


def classification_losses(logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)`` per-example cross-entropy in float32, differentiable; 0 for a target equal to ``ignore_index``.

    The one definition of a classifier's per-example loss: the scoring signal (:func:`classification_signals`)
    and the probes' training and evaluation losses both use it, so they cannot drift apart.
    """
    return F.cross_entropy(logits.float(), targets.long(), reduction="none", ignore_index=ignore_index)


def causal_lm_losses(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)`` mean next-token cross-entropy over each sequence's supervised tokens (HF labels, unshifted).

    Float32 and differentiable; 0 for a sequence without a supervised token. The one definition of a causal
    LM's per-sequence loss, shared by :func:`causal_lm_signals` and the probes.
    """
    shifted = labels[:, 1:].long()
    token = classification_losses(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=ignore_index
    ).view(shifted.shape)
    return token.sum(dim=1) / (shifted != ignore_index).sum(dim=1).clamp(min=1)


def classification_signals(
    logits: Tensor,
    head_input: Tensor,
    targets: Tensor,
    has_bias: bool,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> ExampleSignals:
    """Per-example cross-entropy loss and exact head-gradient norm for a classifier.

    Args:
        logits: ``(B, C)`` head output.
        head_input: ``(B, d)`` head input (penultimate features).
        targets: ``(B,)`` integer class indices. Entries equal to ``ignore_index`` (or otherwise outside
            ``[0, C)``) give NaN loss and grad_norm and ``length = 0`` for that row.
        has_bias: whether the head has a bias; adds the bias gradient ``e`` to the norm.

    Returns:
        float32 ``ExampleSignals`` on the inputs' device with ``embedding = head_input``, ``length = 1``
        (0 for ignored targets), ``error_norm = ‖e‖`` (EL2N) and ``label = targets`` (-1 for ignored ones).

    Example:
        >>> h = torch.randn(4, 8); head = torch.nn.Linear(8, 3)
        >>> s = classification_signals(head(h), h, torch.tensor([0, 1, 2, 0]), has_bias=True)
        >>> s.grad_norm.shape
        torch.Size([4])
    """
    _check_classification_shapes(logits, head_input, targets)
    z = logits.detach().float()
    h = head_input.detach().float()
    y = targets.detach().long()
    valid = (y >= 0) & (y < z.shape[1])
    y_safe = torch.where(valid, y, torch.zeros_like(y))  # one_hot/gather need in-range indices

    loss = classification_losses(z, y_safe)
    e = torch.softmax(z, dim=-1) - F.one_hot(y_safe, z.shape[1]).to(z.dtype)
    h_sq = h.pow(2).sum(-1) + (1.0 if has_bias else 0.0)
    error_norm = e.norm(dim=-1)  # EL2N: the head-gradient norm is this times ‖(h, 1)‖
    grad_norm = error_norm * h_sq.sqrt()

    nan = torch.full_like(loss, float("nan"))
    return ExampleSignals(
        loss=torch.where(valid, loss, nan),
        grad_norm=torch.where(valid, grad_norm, nan),
        embedding=h,
        length=valid.long(),
        error_norm=torch.where(valid, error_norm, nan),
        label=torch.where(valid, y, torch.full_like(y, -1)),
    )


def causal_lm_signals(
    logits: Tensor,
    hidden: Tensor,
    labels: Tensor,
    has_bias: bool,
    *,
    ignore_index: int = IGNORE_INDEX,
    block_size: int = 1024,
) -> ExampleSignals:
    """Per-sequence loss and exact LM-head gradient norm, Hugging Face label convention.

    Logits at position ``t`` predict ``labels[t + 1]`` (the shift happens here, as in HF models). With
    ``T_eff`` supervised tokens (labels ``!= ignore_index`` after the shift) and
    ``e_t = (p_t - onehot(y_t)) / T_eff`` on supervised positions, the gradient of the mean token loss
    with respect to the head weight is ``G = Σ_t e_t h_tᵀ`` and

        ``‖G‖²_F (+ ‖Σ_t e_t‖² for the bias) = Σ_{t,s} (e_t·e_s)(h_t·h_s [+ 1])``,

    evaluated from the ``(B, T, T)`` Gram matrices of groups of sequences (as many as keep their float32
    probabilities under 2^26 floats), in row blocks of at most ``block_size`` positions (fewer for a wide group,
    so a block's products stay under 2^24 floats), so the ``V × d`` gradient is never formed. No per-sequence
    Python loop and no indexing by a mask: nothing in here waits for the device.

    A sequence with no supervised token gets ``loss = grad_norm = NaN`` and a NaN embedding, with
    ``length = 0``; the caller excludes non-finite rows and counts them.

    Args:
        logits: ``(B, T, V)`` LM-head output.
        hidden: ``(B, T, d)`` LM-head input (final hidden states).
        labels: ``(B, T)`` integer token ids, ``ignore_index`` where unsupervised (unshifted).
        has_bias: whether the LM head has a bias.

    Returns:
        float32 ``ExampleSignals``: ``embedding`` is the mean of ``h_t`` over the positions whose logits
        predict a supervised label, ``length`` is ``T_eff``, ``error_norm`` is the mean over those
        positions of the per-token EL2N ``‖p_t − onehot(y_t)‖``.

    Example:
        >>> h = torch.randn(2, 5, 8); head = torch.nn.Linear(8, 11, bias=False)
        >>> labels = torch.randint(0, 11, (2, 5)); labels[1, 3:] = -100
        >>> causal_lm_signals(head(h), h, labels, has_bias=False).length.tolist()
        [4, 2]
    """
    _check_causal_lm_shapes(logits, hidden, labels)
    # Shift: position t's logits and hidden state are scored against the label at t + 1.
    z_all, h_all, y_all = logits.detach()[:, :-1], hidden.detach()[:, :-1], labels.detach()[:, 1:].long()
    # Sequences in groups whose float32 probabilities stay under _GROUP_FLOATS (a whole small-vocabulary batch;
    # one GPT-2 sequence of 1,024 tokens), each group without a Python loop over its sequences: slicing by range,
    # never indexing by a mask, so nothing here waits for the device.
    per_sequence = max(1, z_all.shape[1] * z_all.shape[2])
    group = max(1, _GROUP_FLOATS // per_sequence)
    parts = [
        _causal_lm_group(z_all[g : g + group], h_all[g : g + group], y_all[g : g + group], has_bias, ignore_index, block_size)
        for g in range(0, max(1, z_all.shape[0]), group)  # an empty batch is one empty group
    ]
    return parts[0] if len(parts) == 1 else ExampleSignals.cat(parts)


#: Float32 probabilities one group of sequences may hold at once in :func:`causal_lm_signals` (256 MiB).
_GROUP_FLOATS = 1 << 26


def _causal_lm_group(
    z: Tensor, h: Tensor, y: Tensor, has_bias: bool, ignore_index: int, block_size: int
) -> ExampleSignals:
    """:func:`causal_lm_signals` for a group of already shifted sequences, all at once."""
    z, h = z.float(), h.float()
    mask = y != ignore_index
    n = mask.sum(dim=1)  # T_eff per sequence
    weight = mask.float()
    count = n.clamp(min=1).float()
    # Unsupervised positions are zeroed rather than indexed out. Indexing each sequence by its mask cost a
    # device synchronisation per example: on an H200 the scoring pass ran at 1/80 of the model's forward rate.
    token_loss = classification_losses(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=ignore_index)
    loss = (token_loss.view(y.shape) * weight).sum(dim=1) / count
    e = torch.softmax(z, dim=-1)
    target = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(-1)  # any in-range id where unsupervised
    e.scatter_add_(-1, target, -weight.unsqueeze(-1))  # p_t - onehot(y_t) where supervised
    e *= (weight / count.unsqueeze(1)).unsqueeze(-1)  # 0 where unsupervised, so those positions add nothing below
    error_norm = e.norm(dim=-1).sum(dim=1)  # = mean_t ‖p_t − onehot(y_t)‖, since every row was divided by T_eff
    steps = h.shape[1]
    # Row blocks of the two Gram matrices, so that one block's products stay under 2^24 floats.
    block = max(1, min(int(block_size), (1 << 24) // max(1, h.shape[0] * steps)))
    sq = z.new_zeros(z.shape[0])
    for start in range(0, steps, block):
        stop = min(start + block, steps)
        ee = e[:, start:stop] @ e.transpose(1, 2)
        hh = h[:, start:stop] @ h.transpose(1, 2)
        if has_bias:
            hh += 1.0
        sq += (ee * hh).sum(dim=(1, 2))
    embedding = (h * weight.unsqueeze(-1)).sum(dim=1) / count.unsqueeze(1)
    valid = n > 0
    nan = torch.tensor(float("nan"), dtype=torch.float32, device=z.device)
    return ExampleSignals(
        loss=torch.where(valid, loss, nan),
        # The quadratic form is PSD; clamp only guards rounding to a tiny negative value.
        grad_norm=torch.where(valid, sq.clamp_min(0.0).sqrt(), nan),
        embedding=torch.where(valid.unsqueeze(1), embedding, nan),
        length=n.long(),
        error_norm=torch.where(valid, error_norm, nan),
    )


def _check_classification_shapes(logits: Tensor, head_input: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2 or head_input.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            "classification_signals expects logits (B, C), head_input (B, d), targets (B,); got "
            f"{tuple(logits.shape)}, {tuple(head_input.shape)}, {tuple(targets.shape)}."
        )
    if not (logits.shape[0] == head_input.shape[0] == targets.shape[0]):
        raise ValueError(
            "classification_signals: batch sizes differ: "
            f"{logits.shape[0]}, {head_input.shape[0]}, {targets.shape[0]}."
        )


def _check_causal_lm_shapes(logits: Tensor, hidden: Tensor, labels: Tensor) -> None:
    if logits.ndim != 3 or hidden.ndim != 3 or labels.ndim != 2:
        raise ValueError(
            "causal_lm_signals expects logits (B, T, V), hidden (B, T, d), labels (B, T); got "
            f"{tuple(logits.shape)}, {tuple(hidden.shape)}, {tuple(labels.shape)}."
        )
    if not (logits.shape[:2] == hidden.shape[:2] == labels.shape):
        raise ValueError(
            "causal_lm_signals: (B, T) differ: "
            f"{tuple(logits.shape[:2])}, {tuple(hidden.shape[:2])}, {tuple(labels.shape)}."
        )
