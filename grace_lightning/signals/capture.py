"""Getting per-example signals out of a user's ``LightningModule`` without changing the module.

``SignalExtractor.for_module(pl_module, example_batch)`` picks one of three modes, first match wins:

1. ``"custom"``: the LightningModule defines ``coreset_signals(self, batch) -> ExampleSignals``.
2. ``"causal_lm"``: the module contains a ``transformers.PreTrainedModel`` whose ``get_output_embeddings()``
   is an ``nn.Linear`` and the batch is a ``Mapping`` with ``input_ids``. Labels are ``batch["labels"]``
   (Hugging Face convention: unshifted, ``-100`` = ignored) or, without them, ``input_ids`` with
   ``attention_mask == 0`` positions set to ``-100``.
3. ``"classification"``: the batch is a tuple/list ``(inputs, targets, ...)`` with integer ``targets`` of
   shape ``(B,)`` and the module has an ``nn.Linear``. The head is the module's ``head``, ``fc``,
   ``classifier`` or ``lm_head`` attribute if that is an ``nn.Linear``, else the last ``nn.Linear`` in
   ``named_modules()`` order. The head's output must be the logits of the cross-entropy loss, and that is
   verified at the first batch, not assumed (see below).

``for_module`` then calls ``verify(example_batch)``: one forward of the batch in eval mode under
``torch.no_grad()`` (every submodule's ``training`` flag is restored afterwards, and the global RNG state is
left as it was, so resumed runs stay bit-exact) must show that the hooked head produced what the module
returns. Classification: some tensor ``pl_module(inputs)`` returns (a Tensor, a tuple/list of them, or a
Mapping/``ModelOutput`` with ``"logits"``) must equal the head's output, or its ``log_softmax`` along the last
dim (a module returning ``log_softmax(head(h))`` has the same cross-entropy), and the head must have more
outputs than the largest target. Causal LM: the Hugging Face model's ``.logits`` must equal the output
embedding's output, by the same rule. An output layer applied functionally (``F.linear(h, W)``, a cosine head)
would otherwise get a body layer hooked and silently wrong signals; ``verify`` raises ``SignalCaptureError``
naming the hooked module, its output shape and what the module returned; so does a head that does not run in
that forward.

Otherwise ``SignalCaptureError`` explains how to write ``coreset_signals``.

The ``coreset_signals`` contract
--------------------------------
``def coreset_signals(self, batch) -> grace_lightning.ExampleSignals``:

- ``batch`` is exactly what ``training_step`` receives (same structure, already on the model's device);
- it must be forward-only and per-example: return one row per example in the batch (``loss`` and
  ``grad_norm`` of shape ``(B,)``, optionally ``embedding`` ``(B, d)``, ``length`` ``(B,)`` and
  ``error_norm`` ``(B,)``, which the ``el2n`` strategy needs, and ``label`` ``(B,)``, which GRACE's
  ``outvoted_weight`` needs);
- scoring passes call it under ``torch.no_grad()`` with the module in eval mode, so it must not call
  ``backward``, step optimizers, log, or rely on dropout/BatchNorm batch statistics;
- rows that cannot be scored should be NaN (callers exclude and count non-finite rows).

``grace_lightning.signals.classification_signals`` and ``causal_lm_signals`` compute the standard signals
from logits and head inputs. A module with ``coreset_signals`` gets no free capture on training batches:
every signal then comes from scoring passes, because only the module knows how to read its batch.

Free capture on training batches
--------------------------------
``attach()`` puts a persistent forward hook on the head. While ``armed`` it keeps the head's most recent
input and output, detached (no graph is kept alive, nothing in the training computation changes);
``training_batch_signals(batch)`` turns them into signals and releases them. Call it (or ``clear()``) every
step: until then the captured logits stay in memory. Training-time signals reflect train mode (dropout
active), so they differ slightly from scoring-pass signals for models with dropout.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Iterator, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .closed_form import IGNORE_INDEX, causal_lm_losses, causal_lm_signals, classification_losses, classification_signals
from .types import ExampleSignals

__all__ = ["SignalCaptureError", "SignalExtractor", "Mode", "ModuleModes", "inference_forward"]

Mode = Literal["custom", "causal_lm", "classification"]

# Attribute names that, when they hold an nn.Linear, name the classification head outright.
_HEAD_ATTRS = ("head", "fc", "classifier", "lm_head")

_CUSTOM_HINT = (
    "Implement `coreset_signals(self, batch) -> grace_lightning.ExampleSignals` on your LightningModule "
    "(forward-only and per-example; scoring passes call it under torch.no_grad() in eval mode with the batch "
    "exactly as training_step receives it), for example:\n\n"
    "    def coreset_signals(self, batch):\n"
    '        h = self.body(batch["x"]); logits = self.head(h)\n'
    '        return grace_lightning.signals.classification_signals(logits, h, batch["y"], has_bias=True)\n'
)


class SignalCaptureError(ValueError):
    """Per-example signals cannot be captured from this module/batch; the message says how to fix it."""


class ModuleModes:
    """Every submodule's train/eval flag, so a forward in eval mode can restore exactly what the user had."""

    def __init__(self, module: nn.Module) -> None:
        self._modes = [(m, m.training) for m in module.modules()]

    def restore(self) -> None:
        for m, training in self._modes:
            m.training = training


@contextlib.contextmanager
def inference_forward(
    module: nn.Module, forward_context: Callable[[], ContextManager] = contextlib.nullcontext
) -> Iterator[None]:
    """Forward-only passes of ``module``: eval mode, no graph, the precision plugin's context; modes restored.

    The one context every measurement (scoring passes, probe evaluations) runs its forwards in, so dropout and
    BatchNorm behave alike in all of them and the user's train/eval flags are back as they were afterwards.
    """
    modes = ModuleModes(module)
    module.eval()
    try:
        with torch.no_grad(), forward_context():
            yield
    finally:
        modes.restore()


class _HeadRecorder:
    """Forward-hook body that keeps the head's most recent input and output, detached."""

    def __init__(self) -> None:
        self.head_input: Optional[Tensor] = None
        self.head_output: Optional[Tensor] = None
        self.calls = 0

    def record(self, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            return
        # detach(): keep values only, so autograd can free the graph as usual after backward.
        self.head_input = x.detach()
        self.head_output = output.detach()
        self.calls += 1

    def clear(self) -> None:
        self.head_input = None
        self.head_output = None
        self.calls = 0


class SignalExtractor:
    """Reads per-example signals from a LightningModule in one of three modes (see the module docstring).

    Example:
        >>> extractor = SignalExtractor.for_module(pl_module, next(iter(train_loader)))  # doctest: +SKIP
        >>> with torch.no_grad():                                                        # doctest: +SKIP
        ...     signals = extractor.score_batch(batch)
        >>> extractor.attach(); extractor.arm()                   # free capture in training  # doctest: +SKIP
        >>> signals = extractor.training_batch_signals(batch)     # in on_train_batch_end    # doctest: +SKIP
    """

    def __init__(
        self,
        pl_module: nn.Module,
        mode: Mode,
        head: Optional[nn.Linear] = None,
        hf_model: Optional[nn.Module] = None,
    ) -> None:
        if mode != "custom" and head is None:
            raise ValueError(f"SignalExtractor: mode {mode!r} needs a head.")
        if mode == "causal_lm" and hf_model is None:
            raise ValueError("SignalExtractor: mode 'causal_lm' needs the Hugging Face model.")
        self.pl_module = pl_module
        self.mode: Mode = mode
        self.head = head
        self.hf_model = hf_model
        self._armed = False
        self._scoring = False  # the persistent hook ignores scoring forwards
        self._training_capture = _HeadRecorder()
        self._handle: Optional[RemovableHandle] = None

    # ------------------------------------------------------------------ detection

    @classmethod
    def for_module(cls, pl_module: nn.Module, example_batch: Any) -> "SignalExtractor":
        """Pick the capture mode for ``pl_module`` given one training batch (see the module docstring).

        ``example_batch`` is exactly what ``training_step`` receives, on the model's device; the chosen head is
        checked against the module's output on it with :meth:`verify`.

        Raises:
            SignalCaptureError: no mode applies (the message names the batch type and shows how to write
                ``coreset_signals``), or the hooked head is not what the module outputs (see :meth:`verify`).
        """
        if callable(getattr(pl_module, "coreset_signals", None)):
            return cls(pl_module, "custom")
        reasons: list[str] = []
        extractor: Optional[SignalExtractor] = None
        found_lm = _find_causal_lm(pl_module, example_batch, reasons)
        if found_lm is not None:
            hf_model, lm_head = found_lm
            extractor = cls(pl_module, "causal_lm", head=lm_head, hf_model=hf_model)
        else:
            head = _find_classification_head(pl_module, example_batch, reasons)
            if head is not None:
                extractor = cls(pl_module, "classification", head=head)
        if extractor is not None:
            extractor.verify(example_batch)
            return extractor
        raise SignalCaptureError(
            f"grace_lightning cannot infer per-example signals for {type(pl_module).__name__} from a batch of "
            f"type {_describe_batch(example_batch)}.\n"
            + "".join(f"  - {r}\n" for r in reasons)
            + _CUSTOM_HINT
        )

    @property
    def has_bias(self) -> bool:
        """Whether the head has a bias (its gradient is part of ``grad_norm``)."""
        return self.head is not None and self.head.bias is not None

    # ------------------------------------------------------------------ verification

    def verify(self, batch: Any) -> None:
        """Prove on ``batch`` that the hooked head's output is what the module outputs (no-op in custom mode).

        Runs one forward of ``batch`` (on the model's device, as ``training_step`` receives it) with the whole
        module in eval mode under ``torch.no_grad()``; every submodule's ``training`` flag and the global RNG
        state (CPU, and the model's CUDA device) are restored afterwards, also on errors, and eval mode keeps
        BatchNorm statistics unchanged. See the module docstring for what counts as a match.

        Raises:
            SignalCaptureError: the head did not run, its output matches nothing the module returns, the module
                returns no tensor, or (classification) the head has no more outputs than the largest target.
        """
        if self.mode == "custom":
            return
        assert self.head is not None
        recorder = _HeadRecorder()
        modes = ModuleModes(self.pl_module)
        handle = self.head.register_forward_hook(
            lambda _m, args, kwargs, out: recorder.record(args, kwargs, out), with_kwargs=True
        )
        self._scoring = True
        try:
            with torch.random.fork_rng(devices=_cuda_devices(self.pl_module)), torch.no_grad():
                self.pl_module.eval()
                returned = self._run_forward(batch)
        finally:
            handle.remove()
            self._scoring = False
            modes.restore()
        if recorder.head_output is None:
            raise SignalCaptureError(
                f"The head {type(self.head).__name__} did not run during the {self.mode} forward of the first batch, "
                "so its output cannot be the model's logits. " + _CUSTOM_HINT
            )
        hooked = recorder.head_output
        if self.mode == "classification":
            candidates = _returned_tensors(returned)
            what = "the module's forward (pl_module(batch[0]))"
        else:
            candidates = _lm_logits(returned)
            what = f"the Hugging Face model {type(self.hf_model).__name__}'s `.logits`"
        if not candidates:
            raise self._verify_error(
                hooked, returned, f"{what} returned no tensor, so the hooked head cannot be verified against it."
            )
        if not any(_same_logits(hooked, c) for c in candidates):
            raise self._verify_error(
                hooked, returned,
                f"the hooked head's output is not what {what} returned (nor its log_softmax), so it is not the "
                "layer that produces the logits.",
            )
        if self.mode == "classification":
            targets = batch[1]
            if targets.numel() and hooked.ndim >= 1 and int(targets.max()) >= hooked.shape[-1]:
                raise self._verify_error(
                    hooked, returned,
                    f"the targets go up to {int(targets.max())} but the hooked head has only {hooked.shape[-1]} "
                    "outputs, so it cannot be the classifier of these targets.",
                )

    def _head_name(self) -> str:
        for name, module in self.pl_module.named_modules():
            if module is self.head:
                return name or "<the module itself>"
        return "<not a submodule>"

    def _verify_error(self, hooked: Tensor, returned: Any, problem: str) -> SignalCaptureError:
        assert self.head is not None
        if self.mode == "classification":
            fix = (
                "If the output layer is an nn.Linear, name it via an attribute `head`, `fc` or `classifier` of the "
                "LightningModule. If it is applied functionally (F.linear, a cosine/normalised head, a weight-tied "
                "matmul) or is not an nn.Linear, grace_lightning cannot hook it: "
            )
        else:
            fix = "The output embedding does not produce the model's logits: "
        return SignalCaptureError(
            f"grace_lightning {self.mode} capture hooked `{self._head_name()}` ({self.head!r}), whose output has "
            f"shape {tuple(hooked.shape)}, but {problem} The module returned {_describe_batch(returned)}.\n"
            + fix + _CUSTOM_HINT
        )

    # ------------------------------------------------------------------ scoring pass

    def score_batch(self, batch: Any) -> ExampleSignals:
        """Forward-only signals for one batch, float32 on the model's device.

        The caller has set eval mode, moved ``batch`` to the device and (normally) entered ``no_grad``;
        this adds its own ``no_grad`` anyway so that no graph is ever built.

        Raises:
            SignalCaptureError: the head did not run, or its input/output do not match the batch.
        """
        with torch.no_grad():
            if self.mode == "custom":
                return self._score_custom(batch)
            recorder = _HeadRecorder()
            self._forward_hooked(batch, lambda _m, args, kwargs, out: recorder.record(args, kwargs, out))
            if recorder.calls == 0:
                raise SignalCaptureError(
                    f"The head {type(self.head).__name__} did not run during the {self.mode} scoring forward. "
                    + _CUSTOM_HINT
                )
            assert recorder.head_input is not None and recorder.head_output is not None
            return self._signals(batch, recorder.head_input, recorder.head_output)

    def example_losses(self, batch: Any) -> Tensor:
        """``(B,)`` per-example losses of ``batch`` *with* autograd (for probe steps), same definition as ``loss``.

        Classification: cross-entropy of the head's logits. Causal LM: mean next-token cross-entropy over each
        sequence's supervised tokens. Custom mode: ``coreset_signals(batch).loss``, called with grad enabled
        (so it must be differentiable there). The caller chooses train/eval mode and grad mode.
        """
        if self.mode == "custom":
            return self._score_custom_raw(batch).loss
        outputs: list[Tensor] = []
        self._forward_hooked(batch, lambda _m, _args, _kwargs, out: outputs.append(out))
        if not outputs:
            raise SignalCaptureError(f"The head {type(self.head).__name__} did not run during a probe forward. " + _CUSTOM_HINT)
        logits = outputs[-1]
        return self._losses(logits, self._targets(batch).to(logits.device))

    def head_inputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The head's input for ``batch`` (detached) and the targets its loss is measured against.

        With :meth:`head_losses` this splits :meth:`example_losses` at the head: probes that train only the head
        run the body once (the caller chooses the mode, e.g. :func:`inference_forward`) and then the head alone,
        any number of times. Classification: ``(B, D)`` inputs and the targets; causal LM: ``(B, T, D)`` and the
        labels.

        Raises:
            SignalCaptureError: custom mode (there is no hooked head), or the head did not run.
        """
        if self.mode == "custom":
            raise SignalCaptureError(
                "Head-only probes on features need the hooked output layer; a module with `coreset_signals` has "
                "none. Probe with trainable='all' instead."
            )
        recorder = _HeadRecorder()
        self._forward_hooked(batch, lambda _m, args, kwargs, out: recorder.record(args, kwargs, out))
        if recorder.head_input is None:
            raise SignalCaptureError(f"The head {type(self.head).__name__} did not run during a probe forward. " + _CUSTOM_HINT)
        return recorder.head_input, self._targets(batch).to(recorder.head_input.device)

    def head_losses(self, head_input: Tensor, targets: Tensor) -> Tensor:
        """``(B,)`` per-example losses of the head alone on :meth:`head_inputs`' output, with autograd.

        The same definition as :meth:`example_losses`: equal to it whenever the body would give ``head_input``.
        """
        assert self.head is not None, "head_losses needs the hooked head (not custom mode)"
        return self._losses(self.head(head_input), targets)

    def _targets(self, batch: Any) -> Tensor:
        """What the loss compares the logits with: the classification targets, or the LM labels."""
        return batch[1] if self.mode == "classification" else _lm_labels(batch)

    def _losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mode's per-example losses of ``logits`` (one definition for probes, split or whole)."""
        if self.mode == "classification":
            return classification_losses(logits, targets)
        return causal_lm_losses(logits, targets)

    def _score_custom_raw(self, batch: Any) -> ExampleSignals:
        out = self.pl_module.coreset_signals(batch)  # type: ignore[operator]
        if not isinstance(out, ExampleSignals):
            raise SignalCaptureError(
                f"`coreset_signals` must return grace_lightning.ExampleSignals, got {type(out).__name__}."
            )
        return out

    def _score_custom(self, batch: Any) -> ExampleSignals:
        out = self._score_custom_raw(batch)
        return out.to(out.loss.device)  # the declared dtypes (float32, lengths int64), detached

    def _forward_hooked(self, batch: Any, hook: Callable[[nn.Module, tuple, dict, Any], Any]) -> None:
        """The mode's forward of ``batch`` with ``hook(module, args, kwargs, output)`` on the head for its duration."""
        assert self.head is not None
        handle = self.head.register_forward_hook(hook, with_kwargs=True)
        self._scoring = True  # not a training batch: keep it out of the free capture
        try:
            self._run_forward(batch)
        finally:
            handle.remove()
            self._scoring = False

    def _run_forward(self, batch: Any) -> Any:
        """The mode's forward of ``batch``; returns what it returned (only ``verify`` looks at it)."""
        if self.mode == "classification":
            return self.pl_module(batch[0])  # logits come from the hook, whatever forward returns
        assert self.hf_model is not None
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        if _accepts_kwarg(self.hf_model, "use_cache"):
            kwargs["use_cache"] = False  # a KV cache is useless here and costs memory
        return self.hf_model(**kwargs)

    def _signals(self, batch: Any, head_input: Tensor, head_output: Tensor) -> ExampleSignals:
        """Closed-form signals from the head's input/output; SignalCaptureError if shapes don't match."""
        if self.mode == "classification":
            targets = batch[1].to(head_output.device)
            b = targets.shape[0]
            if head_output.ndim != 2 or head_input.ndim != 2 or head_output.shape[0] != b or head_input.shape[0] != b:
                raise _shape_error(self.mode, head_input, head_output, f"targets of shape {tuple(targets.shape)}")
            return classification_signals(head_output, head_input, targets, self.has_bias)
        labels = _lm_labels(batch).to(head_output.device)
        if head_output.ndim != 3 or head_output.shape[:2] != labels.shape or head_input.shape[:2] != labels.shape:
            raise _shape_error(self.mode, head_input, head_output, f"labels of shape {tuple(labels.shape)}")
        return causal_lm_signals(head_output, head_input, labels, self.has_bias)

    # ------------------------------------------------------------------ free capture in training

    @property
    def armed(self) -> bool:
        """Whether the persistent hook (after ``attach()``) is recording head forwards."""
        return self._armed

    def attach(self) -> None:
        """Register the persistent capture hook on the head (no-op in custom mode or if already attached)."""
        if self.mode == "custom" or self._handle is not None:
            return
        assert self.head is not None
        self._handle = self.head.register_forward_hook(self._on_head_forward, with_kwargs=True)

    def arm(self) -> None:
        """Start recording head forwards (e.g. in ``on_train_batch_start``)."""
        self._armed = True

    def disarm(self) -> None:
        """Stop recording head forwards; what was already captured is kept until consumed or cleared."""
        self._armed = False

    def clear(self) -> None:
        """Drop the captured tensors."""
        self._training_capture.clear()

    def detach(self) -> None:
        """Remove the persistent hook, disarm and drop captured tensors."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._armed = False
        self.clear()

    def training_batch_signals(self, batch: Any) -> Optional[ExampleSignals]:
        """Signals for the batch the model just trained on, from the captured head input/output.

        Returns ``None`` in custom mode, if nothing was captured, or if the captured shapes do not match
        ``batch`` (e.g. the head ran on something else). The captured tensors are released either way.
        """
        capture = self._training_capture
        head_input, head_output = capture.head_input, capture.head_output
        self.clear()
        if self.mode == "custom" or head_input is None or head_output is None:
            return None
        try:
            with torch.no_grad():
                return self._signals(batch, head_input, head_output)
        except (SignalCaptureError, KeyError, IndexError, TypeError, AttributeError):
            return None

    def _on_head_forward(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._armed and not self._scoring:
            self._training_capture.record(args, kwargs, output)


# ---------------------------------------------------------------------- helpers


def _find_causal_lm(
    pl_module: nn.Module, batch: Any, reasons: list[str]
) -> Optional[tuple[nn.Module, nn.Linear]]:
    """The outermost HF PreTrainedModel with a Linear output embedding, if the batch is an LM batch."""
    if not (isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor)):
        reasons.append("causal_lm: the batch is not a Mapping with an `input_ids` tensor.")
        return None
    # transformers is optional and slow to import: a module holding a PreTrainedModel has imported it already.
    if "transformers" not in sys.modules:
        reasons.append("causal_lm: transformers is not imported, so the module holds no PreTrainedModel.")
        return None
    import transformers

    for module in pl_module.modules():  # pre-order: the outermost model comes first
        if isinstance(module, transformers.PreTrainedModel):
            out_emb = module.get_output_embeddings()
            if isinstance(out_emb, nn.Linear):
                return module, out_emb
    reasons.append(
        "causal_lm: no transformers.PreTrainedModel submodule whose get_output_embeddings() is an nn.Linear."
    )
    return None


def _find_classification_head(pl_module: nn.Module, batch: Any, reasons: list[str]) -> Optional[nn.Linear]:
    """The head to hook if ``batch`` looks like ``(inputs, integer targets of shape (B,), ...)``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        reasons.append("classification: the batch is not a tuple/list of (inputs, targets).")
        return None
    targets = batch[1]
    if not (
        isinstance(targets, Tensor)
        and targets.ndim == 1
        and not targets.is_floating_point()
        and not targets.is_complex()
        and targets.dtype != torch.bool
    ):
        reasons.append("classification: the second batch item is not an integer tensor of shape (B,).")
        return None
    for name in _HEAD_ATTRS:
        candidate = getattr(pl_module, name, None)
        if isinstance(candidate, nn.Linear):
            return candidate
    linears = [m for _, m in pl_module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        reasons.append("classification: the module has no nn.Linear head.")
        return None
    return linears[-1]


def _lm_labels(batch: Mapping) -> Tensor:
    """``batch["labels"]``, else ``input_ids`` with padding (``attention_mask == 0``) set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _accepts_kwarg(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _shape_error(mode: str, head_input: Tensor, head_output: Tensor, what: str) -> SignalCaptureError:
    return SignalCaptureError(
        f"{mode} capture: the head's input {tuple(head_input.shape)} and output {tuple(head_output.shape)} do "
        f"not match the batch's {what} (the head ran on something other than this batch's examples). "
        + _CUSTOM_HINT
    )


def _cuda_devices(module: nn.Module) -> list[int]:
    """CUDA device indices of ``module``'s parameters/buffers (whose RNG state ``verify`` must preserve)."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    return sorted(d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda")


def _returned_tensors(returned: Any, depth: int = 0) -> list[Tensor]:
    """The tensors a classification forward returned: the Tensor, a tuple/list's, or a Mapping's ``"logits"``."""
    if isinstance(returned, Tensor):
        return [returned]
    if isinstance(returned, Mapping):
        if "logits" in returned:
            return _returned_tensors(returned["logits"], depth + 1)
        items: Any = list(returned.values())
    elif isinstance(returned, (tuple, list)):
        items = returned
    else:
        return []
    if depth >= 2:
        return [t for t in items if isinstance(t, Tensor)]
    return [t for item in items for t in _returned_tensors(item, depth + 1)]


def _lm_logits(returned: Any) -> list[Tensor]:
    """A Hugging Face output's ``.logits`` (or its first item)."""
    logits = getattr(returned, "logits", None)
    if logits is None and isinstance(returned, Mapping):
        logits = returned.get("logits")
    if logits is None and isinstance(returned, (tuple, list)) and returned:
        logits = returned[0]
    if logits is None and isinstance(returned, Tensor):
        logits = returned
    return [logits] if isinstance(logits, Tensor) else []


def _same_logits(hooked: Tensor, returned: Tensor) -> bool:
    """Equal values, or equal ``log_softmax`` along the last dim (same cross-entropy), up to rounding."""
    if returned.shape != hooked.shape or hooked.ndim == 0:
        return False
    if returned.is_complex() or not (returned.is_floating_point() and hooked.is_floating_point()):
        return False
    eps = max(torch.finfo(hooked.dtype).eps, torch.finfo(returned.dtype).eps)
    tol = max(1e-4, 4 * eps)
    a, b = hooked.float(), returned.to(device=hooked.device, dtype=torch.float32)
    if torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True):
        return True
    return torch.allclose(
        torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1), rtol=tol, atol=tol, equal_nan=True
    )


def _describe_batch(batch: Any, depth: int = 0) -> str:
    """A short human description of a batch or of what a forward returned, for error messages."""
    if batch is None:
        return "None"
    if isinstance(batch, Tensor):
        return f"Tensor(shape={tuple(batch.shape)}, dtype={str(batch.dtype).replace('torch.', '')})"
    if isinstance(batch, Mapping):
        logits = batch.get("logits") if "logits" in batch else None
        extra = f", logits={_describe_batch(logits, depth + 1)}" if logits is not None else ""
        return f"{type(batch).__name__} with keys {list(batch.keys())[:8]}{extra}"
    if isinstance(batch, (tuple, list)) and depth == 0:
        items = ", ".join(_describe_batch(b, depth + 1) for b in batch[:4])
        more = ", ..." if len(batch) > 4 else ""
        return f"{type(batch).__name__} of ({items}{more})"
    return type(batch).__name__
