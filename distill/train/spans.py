"""Named spans of a training step (`Spans`, for benchmarks that measure where the time goes) and the
planner's calibration recorder (`SavedTensorBytes`: the bytes each student forward saves for backward)."""

from __future__ import annotations

import contextlib

import torch


class Spans:
    """Named spans of a step, for measuring where the time goes (benchmarks/common.py records them). This
    base records nothing and costs one call per span; GPU work is asynchronous, so a recorder that wants
    device time must synchronise itself."""

    _NULL = contextlib.nullcontext()

    def __call__(self, name: str, stream: str | None = None):
        """A context manager around span `name` (e.g. "student_forward"), of `stream` when it is one's."""
        del name, stream
        return self._NULL

    def step_done(self, record: dict) -> None:
        """Called once per step with the step's metrics record, after the step."""


NO_SPANS = Spans()


def _is_weight(t) -> bool:
    """A parameter, a view of one (linear layers save `weight.t()`), or autocast's cast of one: state."""
    base = t._base if t._is_view() else t
    if isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad):
        return True
    fn = base.grad_fn
    return fn is not None and type(fn).__name__ == "ToCopyBackward0" and \
        type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"


class SavedTensorBytes:
    """A `distill.train.spans.Spans` recorder for calibrating the planner: per stream, the bytes each student
    forward of the trainer's own step saves for backward (saved-tensor hooks; weights, views of them and
    autocast's copies of them are state, not activations, and are left out; a tensor saved twice counts
    once)."""

    def __init__(self):
        self.bytes: dict[str, list[int]] = {}
        self.loss_bytes: dict[str, list[int]] = {}
        """Per stream, what each objective span ("loss") saves for backward beyond the forward's tensors."""
        self._quiet = NO_SPANS
        self._forward_keys: set = set()

    def __call__(self, name: str, stream: str | None = None):
        if name not in ("student_forward", "loss"):
            return self._quiet(name, stream)
        forward = name == "student_forward"
        if forward:
            self._forward_keys = set()
        seen = self._forward_keys if forward else set(self._forward_keys)
        table = self.bytes if forward else self.loss_bytes
        table.setdefault(stream, []).append(0)
        slot = len(table[stream]) - 1

        def pack(t):
            if _is_weight(t):
                return t
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
            if key not in seen:
                seen.add(key)
                table[stream][slot] += t.numel() * t.element_size()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def step_done(self, record: dict) -> None:
        """Nothing per step."""
