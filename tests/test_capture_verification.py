"""SignalExtractor.verify: the hooked head must be proven, at the first batch, to produce what the module outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, SignalCaptureError
from grace_lightning.signals import SignalExtractor
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer


def _batch(dim: int = 8, classes: int = 4, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes  # every class present, so max(y) == classes - 1
    return torch.randn(n, dim, generator=g), y, torch.arange(n)


class _FunctionalHead(TinyClassifier):
    """nn.Linear(8->16) body, output layer applied with F.linear: the body would be hooked as the 'head'."""

    def __init__(self, dim: int = 8, classes: int = 4) -> None:
        super().__init__(dim=dim, classes=classes)
        del self.head
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.W = nn.Parameter(torch.randn(classes, 16) * 0.3)
            self.b = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return F.linear(self.body(x), self.W, self.b)


class _CosineHead(_FunctionalHead):
    """A cosine classifier ``s * normalize(h) @ normalize(W).T`` with W an nn.Parameter."""

    def forward(self, x):
        return 10.0 * F.normalize(self.body(x), dim=-1) @ F.normalize(self.W, dim=-1).T


class _NarrowBody(TinyClassifier):
    """Body layer 8->3 is the last nn.Linear; the real output layer (3->4 classes) is functional."""

    def __init__(self) -> None:
        super().__init__(dim=8, classes=4)
        del self.head
        self.body = nn.Sequential(nn.Linear(8, 3), nn.ReLU())
        self.W = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return F.linear(self.body(x), self.W)


class _NarrowBodyReturnsIt(_NarrowBody):
    """Returns the narrow body's output itself: values match, but targets exceed its width."""

    def forward(self, x):
        return self.body[0](x)


class _LogSoftmaxOut(TinyClassifier):
    """Returns log_softmax(head(h)): same cross-entropy as the head's logits."""

    def forward(self, x):
        return F.log_softmax(self.head(self.body(x)), dim=-1)


class _TupleOut(TinyClassifier):
    """Returns (logits, features)."""

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


class _NoTensorOut(TinyClassifier):
    """A forward that returns no tensor at all."""

    def forward(self, x):
        self.head(self.body(x))
        return None


class _BatchNormDropout(TinyClassifier):
    """BatchNorm and dropout in the body: a train-mode forward would update buffers and draw from the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU())


def test_functional_output_layer_is_rejected_at_for_module():
    """A functional F.linear output layer with an nn.Linear body: for_module raises, naming what was hooked and the fix."""
    with pytest.raises(SignalCaptureError) as info:
        SignalExtractor.for_module(_FunctionalHead(), _batch())
    msg = str(info.value)
    assert "coreset_signals" in msg and "`body.0`" in msg and "(6, 16)" in msg and "(6, 4)" in msg
    assert "`head`" in msg and "`fc`" in msg and "`classifier`" in msg


def test_cosine_head_is_rejected():
    """A cosine head over an nn.Parameter is not hookable: the body layer must not pass as the head."""
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        SignalExtractor.for_module(_CosineHead(), _batch())


def test_body_layer_narrower_than_the_classes_is_rejected():
    """A hooked layer with fewer outputs than the classes fails loudly instead of giving NaN signals."""
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        SignalExtractor.for_module(_NarrowBody(), _batch())
    with pytest.raises(SignalCaptureError, match="targets go up to 3 but the hooked head has only 3 outputs"):
        SignalExtractor.for_module(_NarrowBodyReturnsIt(), _batch())


def test_forward_returning_no_tensor_cannot_be_verified():
    """If forward returns no tensor, the error says the head cannot be verified."""
    with pytest.raises(SignalCaptureError, match="cannot be verified"):
        SignalExtractor.for_module(_NoTensorOut(), _batch())


@pytest.mark.parametrize("model_cls", [TinyClassifier, _LogSoftmaxOut, _TupleOut])
def test_models_whose_head_produces_the_output_pass(model_cls):
    """Plain logits, log_softmax(logits) and (logits, features) returns all verify, and the head is kept."""
    model = model_cls()
    ex = SignalExtractor.for_module(model, _batch())
    assert ex.mode == "classification" and ex.head is model.head
    ex.verify(_batch(seed=1))  # and again on another batch, explicitly
    assert not model.head._forward_hooks and not model.head._forward_hooks_with_kwargs


def test_verify_keeps_modes_rng_and_buffers():
    """verify runs in eval mode under no_grad: training flags restored exactly, RNG and BatchNorm buffers untouched."""
    model = _BatchNormDropout()
    model.train()
    model.body[2].eval()  # a user-chosen mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    ex = SignalExtractor.for_module(model, _batch())
    ex.verify(_batch(seed=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_verify_restores_modes_when_forward_raises():
    """Training flags are restored even if the verification forward raises."""

    class Boom(TinyClassifier):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Boom().train()
    ex = SignalExtractor(model, "classification", head=model.head)
    with pytest.raises(RuntimeError, match="boom"):
        ex.verify(_batch())
    assert all(m.training for m in model.modules())
    assert not model.head._forward_hooks_with_kwargs


def test_fit_with_grace_on_functional_head_fails_at_the_first_batch():
    """End to end: Trainer.fit with the grace strategy raises SignalCaptureError before any training step."""
    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    model = _FunctionalHead()
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        quiet_trainer(callbacks=[CoresetCallback(sampler, strategy="grace")]).fit(
            model, DataLoader(data, batch_size=8, sampler=sampler)
        )
    assert model.seen == []


def test_tiny_gpt2_in_a_lightning_module_passes_verification():
    """A Hugging Face GPT-2 in a LightningModule: the lm_head output equals the model's .logits."""
    transformers = pytest.importorskip("transformers")

    class LM(LightningModule):
        def __init__(self):
            super().__init__()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
                self.lm = transformers.GPT2LMHeadModel(cfg)

        def training_step(self, batch, batch_idx):
            return self.lm(**batch).loss

    module = LM().train()
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rng = torch.get_rng_state()
    ex = SignalExtractor.for_module(module, batch)
    assert ex.mode == "causal_lm" and ex.head is module.lm.lm_head
    ex.verify(batch)
    assert torch.equal(torch.get_rng_state(), rng) and all(m.training for m in module.modules())
