"""Closed-form signals against autograd, and capture-mode detection / hooks on LightningModules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from grace_lightning.signals.capture import _find_classification_head
from grace_lightning.signals import (
    ExampleSignals,
    SignalCaptureError,
    SignalExtractor,
    causal_lm_signals,
    classification_signals,
)

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------- fixtures


class MLP(LightningModule):
    def __init__(self, d_in: int = 6, d_hidden: int = 12, n_classes: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU())
        self.out = nn.Linear(d_hidden, n_classes, bias=bias)  # not a preferred name: found as last Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)) * 1.0  # the return value is not the head output object itself

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class MLPWithCustom(MLP):
    def coreset_signals(self, batch) -> ExampleSignals:
        h = self.body(batch["x"])
        return classification_signals(self.out(h), h, batch["y"], has_bias=True)


class MLPWithUnusedHead(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(12, 5)  # preferred by name, but forward never calls it


def tiny_gpt2() -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


class LMModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


def lm_batch(with_labels: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[0, :4] = -100  # a prompt that is not supervised
        labels[3, 1:] = -100  # no supervised token after the shift
        batch["labels"] = labels
    return batch


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= rtol * b.abs() + 1e-7).all())


# ---------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("bias", [True, False])
def test_classification_grad_norm_matches_autograd(bias: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(7, 4, bias=bias)
    h = torch.randn(9, 7)
    y = torch.randint(0, 4, (9,))
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss_one(p, hi, yi):
        z = torch.func.functional_call(head, p, (hi[None],))
        return F.cross_entropy(z, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, h, y)
    ref = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))

    with torch.no_grad():
        s = classification_signals(head(h), h, y, has_bias=bias)
    assert rel_close(s.grad_norm, ref)
    assert torch.allclose(s.loss, F.cross_entropy(head(h), y, reduction="none").detach(), atol=1e-6)
    assert torch.equal(s.embedding, h)
    assert s.length.tolist() == [1] * 9
    el2n = (torch.softmax(head(h), -1) - F.one_hot(y, 4)).norm(dim=-1).detach()
    assert torch.allclose(s.error_norm, el2n, atol=1e-6)
    assert s.label.dtype == torch.int64 and torch.equal(s.label, y)


def test_classification_low_precision_inputs_give_float32() -> None:
    torch.manual_seed(0)
    h = torch.randn(3, 5, dtype=torch.bfloat16)
    z = torch.randn(3, 4, dtype=torch.bfloat16)
    s = classification_signals(z, h, torch.tensor([0, 3, -100]), has_bias=True)
    assert s.loss.dtype == s.grad_norm.dtype == s.embedding.dtype == torch.float32
    assert torch.isfinite(s.grad_norm[:2]).all() and math.isnan(s.grad_norm[2]) and math.isnan(s.loss[2])
    assert s.error_norm.dtype == torch.float32 and math.isnan(s.error_norm[2]) and torch.isfinite(s.error_norm[:2]).all()
    assert s.length.tolist() == [1, 1, 0]
    assert s.label.tolist() == [0, 3, -1]  # an ignored target has no label


def _lm_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Per-sequence loss and ‖∂loss/∂W‖ for logits = h Wᵀ with h fixed, by autograd."""
    losses, norms = [], []
    for b in range(hidden.shape[0]):
        w = weight.detach().clone().requires_grad_(True)
        logits = hidden[b : b + 1].detach() @ w.T
        loss = F.cross_entropy(logits[0, :-1], labels[b, 1:], ignore_index=-100)
        (g,) = torch.autograd.grad(loss, w)
        losses.append(loss.detach())
        norms.append(g.norm())
    return torch.stack(losses), torch.stack(norms)


def test_causal_lm_grad_norm_and_loss_match_autograd_and_hf() -> None:
    model = tiny_gpt2()
    batch = lm_batch(with_labels=True)
    captured = {}
    handle = model.lm_head.register_forward_hook(lambda m, i, o: captured.update(h=i[0].detach(), z=o.detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    labels = batch["labels"]
    s = causal_lm_signals(captured["z"], captured["h"], labels, has_bias=False, block_size=3)  # several blocks
    ref_loss, ref_norm = _lm_reference(captured["h"], model.lm_head.weight, labels)

    supervised = torch.tensor([True, True, True, False])
    assert rel_close(s.grad_norm[supervised], ref_norm[supervised])
    assert rel_close(s.loss[supervised], ref_loss[supervised])
    assert s.length.tolist() == [6, 5, 2, 0]
    # HF's own per-sequence loss, each sequence run alone with its own mask.
    with torch.no_grad():
        for b in range(3):
            hf = model(**{k: v[b : b + 1] for k, v in batch.items()}).loss
            assert abs(float(s.loss[b]) - float(hf)) <= 1e-5 * abs(float(hf))
    # Embedding: mean of the hidden states whose logits predict a supervised label.
    mask = labels[0, 1:] != -100
    assert torch.allclose(s.embedding[0], captured["h"][0, :-1][mask].mean(0), atol=1e-6)


def test_causal_lm_with_bias_matches_autograd() -> None:
    torch.manual_seed(0)
    head = nn.Linear(6, 13)
    h = torch.randn(3, 8, 6)
    labels = torch.randint(0, 13, (3, 8))
    labels[1, 5:] = -100
    labels[2, ::2] = -100
    s = causal_lm_signals(head(h).detach(), h, labels, has_bias=True, block_size=4)
    for b in range(3):
        head.zero_grad()
        F.cross_entropy(head(h[b])[:-1], labels[b, 1:], ignore_index=-100).backward()
        ref = torch.sqrt(head.weight.grad.pow(2).sum() + head.bias.grad.pow(2).sum())
        assert rel_close(s.grad_norm[b : b + 1], ref[None])
        # EL2N per sequence: the mean over supervised positions of the per-token ‖p_t − onehot(y_t)‖.
        keep = labels[b, 1:] != -100
        p = torch.softmax(head(h[b])[:-1][keep], -1).detach()
        per_token = (p - F.one_hot(labels[b, 1:][keep], 13)).norm(dim=-1)
        assert torch.allclose(s.error_norm[b], per_token.mean(), atol=1e-6)


def test_causal_lm_sequence_without_supervision_is_nan() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4)
    z = torch.randn(2, 5, 9)
    labels = torch.randint(0, 9, (2, 5))
    labels[1, 1:] = -100  # only position 0 is labelled, and it is never predicted
    s = causal_lm_signals(z, h, labels, has_bias=False)
    assert torch.isfinite(s.loss[0]) and torch.isfinite(s.grad_norm[0])
    assert math.isnan(s.loss[1]) and math.isnan(s.grad_norm[1]) and torch.isnan(s.embedding[1]).all()
    assert torch.isfinite(s.error_norm[0]) and math.isnan(s.error_norm[1])
    assert s.length.tolist() == [4, 0]
    assert s.label is None  # a sequence has no one class label


# ---------------------------------------------------------------------- mode detection


def test_detects_classification_on_mlp() -> None:
    module = MLP()
    ex = SignalExtractor.for_module(module, (torch.randn(4, 6), torch.randint(0, 5, (4,))))
    assert ex.mode == "classification" and ex.head is module.out and ex.has_bias


def test_prefers_named_head_attribute() -> None:
    module = MLPWithUnusedHead()
    ex = SignalExtractor(module, "classification", head=module.head)
    assert _find_classification_head(module, (torch.randn(4, 6), torch.randint(0, 5, (4,))), []) is module.head
    # ...and a head that never runs is reported, naming the custom hook: when scoring, and at the first batch.
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        ex.score_batch((torch.randn(4, 6), torch.randint(0, 5, (4,))))
    with pytest.raises(SignalCaptureError, match="did not run during the classification forward.*coreset_signals"):
        SignalExtractor.for_module(module, (torch.randn(4, 6), torch.randint(0, 5, (4,))))
    assert not module.head._forward_hooks


def test_detects_causal_lm_on_wrapped_gpt2() -> None:
    module = LMModule()
    ex = SignalExtractor.for_module(module, lm_batch())
    assert ex.mode == "causal_lm"
    assert ex.hf_model is module.model and ex.head is module.model.lm_head and not ex.has_bias


def test_detects_custom() -> None:
    module = MLPWithCustom().eval()
    batch = {"x": torch.randn(4, 6), "y": torch.randint(0, 5, (4,))}
    ex = SignalExtractor.for_module(module, batch)
    assert ex.mode == "custom"
    s = ex.score_batch(batch)
    assert s.loss.shape == (4,) and s.loss.dtype == torch.float32
    assert s.error_norm is not None and s.error_norm.shape == (4,)  # custom captures carry EL2N through
    ex.attach()
    ex.arm()
    module.coreset_signals(batch)
    assert ex.training_batch_signals(batch) is None  # no free capture in custom mode
    assert not module.out._forward_hooks


def test_dict_batch_on_plain_mlp_raises_helpful_error() -> None:
    with pytest.raises(SignalCaptureError) as info:
        SignalExtractor.for_module(MLP(), {"x": torch.randn(4, 6), "y": torch.randint(0, 5, (4,))})
    msg = str(info.value)
    assert "coreset_signals" in msg and "dict" in msg and "'x'" in msg


def test_float_targets_are_not_classification() -> None:
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        SignalExtractor.for_module(MLP(), (torch.randn(4, 6), torch.randn(4)))


# ---------------------------------------------------------------------- scoring pass and free capture


def test_classification_score_batch_matches_closed_form() -> None:
    torch.manual_seed(0)
    module = MLP().eval()
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    ex = SignalExtractor.for_module(module, (x, y))
    s = ex.score_batch((x, y))
    h = module.body(x)
    ref = classification_signals(module.out(h), h, y, has_bias=True)
    assert torch.allclose(s.grad_norm, ref.grad_norm) and torch.allclose(s.loss, ref.loss)
    assert not module.out._forward_hooks


def test_classification_training_capture_equals_score_batch() -> None:
    torch.manual_seed(0)
    module = MLP().eval()  # eval and no dropout: training forward == scoring forward
    batch = (torch.randn(8, 6), torch.randint(0, 5, (8,)))
    ex = SignalExtractor.for_module(module, batch)
    ex.attach()
    module(batch[0])
    assert ex.training_batch_signals(batch) is None  # not armed: nothing captured

    ex.arm()
    loss = F.cross_entropy(module(batch[0]), batch[1])
    assert ex.armed and not ex._training_capture.head_output.requires_grad  # no graph kept alive
    loss.backward()  # training computation unaffected
    scored = ex.score_batch(batch)  # a scoring forward does not overwrite the training capture
    captured = ex.training_batch_signals(batch)
    assert captured is not None
    assert torch.allclose(captured.grad_norm, scored.grad_norm) and torch.allclose(captured.loss, scored.loss)
    assert torch.allclose(captured.embedding, scored.embedding)
    assert torch.allclose(captured.error_norm, scored.error_norm)
    assert ex.training_batch_signals(batch) is None  # consumed

    module(batch[0])
    assert ex.training_batch_signals((batch[0][:3], batch[1][:3])) is None  # shapes don't match the batch
    ex.detach()
    assert not module.out._forward_hooks and not module.out._forward_hooks_with_kwargs and not ex.armed


def test_causal_lm_score_batch_and_training_capture() -> None:
    module = LMModule()
    batch = lm_batch()  # no labels: derived from input_ids and the attention mask
    ex = SignalExtractor.for_module(module, batch)
    scored = ex.score_batch(batch)
    assert scored.length.tolist() == [9, 5, 2, 9]
    assert torch.isfinite(scored.grad_norm).all()

    ex.attach()
    ex.arm()
    module.model(**batch, labels=batch["input_ids"]).loss.backward()
    captured = ex.training_batch_signals(batch)
    ex.detach()
    assert captured is not None
    assert torch.allclose(captured.grad_norm, scored.grad_norm, rtol=1e-5)
    assert torch.allclose(captured.loss, scored.loss, rtol=1e-5)
    assert torch.isfinite(scored.error_norm).all() and torch.allclose(captured.error_norm, scored.error_norm, rtol=1e-5)
    assert not module.model.lm_head._forward_hooks


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_losses_split_at_the_head_equal_the_whole_modules(kind) -> None:
    """head_inputs + head_losses (what frozen-feature probes run) give example_losses' numbers and gradients."""
    if kind == "causal_lm":
        module, batch = LMModule(), lm_batch(with_labels=True)
        batch["labels"][0, 2:5] = -100  # unsupervised tokens inside a sequence too
    else:
        torch.manual_seed(0)
        module, batch = MLP(bias=False), (torch.randn(6, 6), torch.tensor([0, 4, 1, 1, 3, 2]))
    extractor = SignalExtractor.for_module(module, batch)
    module.eval()
    whole = extractor.example_losses(batch)
    with torch.no_grad():
        inputs, targets = extractor.head_inputs(batch)
    split = extractor.head_losses(inputs, targets)
    assert torch.allclose(split, whole, rtol=1e-5, atol=1e-6) and torch.isfinite(split).all()
    head_weight = extractor.head.weight
    (g_whole,) = torch.autograd.grad(whole.sum(), head_weight, retain_graph=True)
    (g_split,) = torch.autograd.grad(split.sum(), head_weight)
    if kind == "classification":  # a tied head (GPT-2's) also feeds the body, whose share the split leaves out
        assert torch.allclose(g_split, g_whole, rtol=1e-4, atol=1e-6)
    assert not inputs.requires_grad and g_split.abs().sum() > 0


def test_custom_mode_has_no_head_to_split_at() -> None:
    module = MLPWithCustom()
    extractor = SignalExtractor.for_module(module, {"x": torch.randn(3, 6), "y": torch.tensor([0, 1, 2])})
    with pytest.raises(SignalCaptureError, match="trainable='all'"):
        extractor.head_inputs({"x": torch.randn(3, 6), "y": torch.tensor([0, 1, 2])})


def test_causal_lm_signals_in_groups_equal_the_whole_batch(monkeypatch) -> None:
    """Sequences split into groups (a large vocabulary) give the signals the whole batch gives at once."""
    import grace_lightning.signals.closed_form as closed_form

    torch.manual_seed(3)
    head = nn.Linear(6, 13)
    h = torch.randn(5, 9, 6)
    labels = torch.randint(0, 13, (5, 9))
    labels[1, 4:] = -100
    labels[3, 1:] = -100  # no supervised token
    whole = causal_lm_signals(head(h).detach(), h, labels, has_bias=True)
    monkeypatch.setattr(closed_form, "_GROUP_FLOATS", 2 * 8 * 13)  # two sequences a group: groups of 2, 2, 1
    grouped = causal_lm_signals(head(h).detach(), h, labels, has_bias=True)
    for name in ("loss", "grad_norm", "embedding", "error_norm", "length"):
        assert torch.allclose(getattr(grouped, name), getattr(whole, name), equal_nan=True, atol=1e-6), name
    empty = causal_lm_signals(head(h[:0]).detach(), h[:0], labels[:0], has_bias=True)
    assert len(empty) == 0 and empty.embedding.shape == (0, 6)
