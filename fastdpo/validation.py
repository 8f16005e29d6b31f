"""Input checks: every bad input becomes a ValueError (TypeError for a wrong type) naming the argument
as the caller wrote it, what was expected and what came.

The same checks serve `linear_logprobs` (hidden, weight, targets, bias) and `FastDPOLoss`
(hidden_states, lm_head_weight, labels, lm_head_bias, and the reference's own names): callers pass
the names their users know through `Names`.

The kernels index W only through tile columns, so an out-of-range label could never make them read
out of bounds; it would silently give a wrong log-prob instead, which is why labels are checked here.
That check reads the labels' values (a host sync), so it runs inside the custom op
fastdpo::checked_targets (fastdpo.ops), which compiled graphs call as they are; everything else here
reads metadata only and is traced by torch.compile without a graph break.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .backends import resolve_backend, triton_interpreting
from .heads import autocast_head, is_distributed_head
from .ops import checked_targets as _checked_targets_op
from .transform import LogitTransform

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class InputTypeError(TypeError, ValueError):
    """A tensor argument that is not a tensor (a list, a NumPy array...).

    A TypeError, and also a ValueError so that `except ValueError` catches every bad input of fastdpo.
    """


class Names(NamedTuple):
    """How the caller called the four inputs of one log-prob computation."""

    hidden: str = "hidden"
    weight: str = "weight"
    targets: str = "targets"
    bias: str = "bias"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def require_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    _require(len(set(devices.values())) <= 1, f"all tensors must be on one device, got {devices}")


def check_logit_options(transform: LogitTransform, grad_tolerance=0.0) -> None:
    """The logit transform and the gradient tolerance: finite numbers in their ranges."""
    temperature, softcap, logit_scale = transform.temperature, transform.softcap, transform.logit_scale
    _require(_is_real(temperature) and math.isfinite(temperature) and temperature > 0,
             f"temperature must be > 0 and finite, got {temperature!r}")
    _require(softcap is None or (_is_real(softcap) and math.isfinite(softcap) and softcap > 0),
             f"softcap must be None or > 0 and finite, got {softcap!r}")
    _require(_is_real(logit_scale) and math.isfinite(logit_scale) and logit_scale > 0,
             f"logit_scale must be > 0 and finite, got {logit_scale!r}")
    _require(_is_real(grad_tolerance) and 0 <= grad_tolerance < 1,
             f"grad_tolerance must be in [0, 1), got {grad_tolerance!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_logprob_inputs(hidden, weight, targets, bias, ignore_index: int, backend: str, *,
                         transform: LogitTransform = LogitTransform(), grad_tolerance=0.0,
                         names: Names = Names()) -> None:
    """check_logprob_metadata, then the targets' range."""
    check_logprob_metadata(hidden, weight, targets, bias, ignore_index, backend, transform=transform,
                           grad_tolerance=grad_tolerance, names=names)
    check_targets_in_range(targets, weight.shape[0], ignore_index, names.targets)


def check_logprob_metadata(hidden, weight, targets, bias, ignore_index: int, backend: str, *,
                           transform: LogitTransform = LogitTransform(), grad_tolerance=0.0,
                           names: Names = Names()) -> None:
    """Everything about the inputs that their metadata tells (no host sync): types, shapes, dtypes, devices."""
    for name, t in zip(names, (hidden, weight, targets)):
        require_tensor(name, t)
    require_tensor(names.bias, bias, optional=True)
    h, w, y, b = names
    _require(hidden.dim() >= 1, f"{h} must have a trailing hidden dimension, got shape {_shape(hidden)}")
    _require(hidden.shape[-1] > 0, f"{h} must have at least one hidden feature, got shape {_shape(hidden)}")
    _require(weight.dim() == 2, f"{w} must be [vocab, hidden], got shape {_shape(weight)}")
    _require(hidden.shape[-1] == weight.shape[1],
             f"hidden size mismatch: {h} has {hidden.shape[-1]} features (shape {_shape(hidden)}), {w} expects "
             f"{weight.shape[1]} (shape {_shape(weight)})")
    _require(weight.shape[0] > 0, f"{w} must have at least one vocabulary row, got shape {_shape(weight)}")
    _require(targets.shape == hidden.shape[:-1],
             f"{y} must have shape {_shape(hidden)[:-1]} ({h} without its last dim), got {_shape(targets)}")
    _require(not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool,
             f"{y} must be an integer tensor, got {targets.dtype}")
    _require(hidden.is_floating_point(), f"{h} must be floating point, got {hidden.dtype}")
    _require(weight.is_floating_point(), f"{w} must be floating point, got {weight.dtype}")
    # Under autocast the head runs in the autocast dtype (heads.autocast_head casts it), as nn.Linear would.
    autocast = torch.is_autocast_enabled(hidden.device.type)
    dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
    _require(autocast or weight.dtype == hidden.dtype, f"{w} dtype {weight.dtype} must match {h} dtype {hidden.dtype}")
    if bias is not None:
        _require(bias.shape == (weight.shape[0],), f"{b} must have shape ({weight.shape[0]},), got {_shape(bias)}")
        _require(autocast or bias.dtype == hidden.dtype, f"{b} dtype {bias.dtype} must match {h} dtype {hidden.dtype}")
    check_same_device(**{h: hidden, w: weight, y: targets, b: bias})
    if backend == "triton":
        _require(dtype in TRITON_DTYPES,
                 f"backend='triton' supports {TRITON_DTYPES} inputs, got {h} of {dtype}; use backend='torch'")
        # Triton's interpreter computes bf16 tl.dot wrongly: refuse rather than answer garbage.
        _require(not (dtype == torch.bfloat16 and hidden.device.type != "cuda" and triton_interpreting()),
                 f"backend='triton' cannot run bfloat16 inputs ({h}) under TRITON_INTERPRET=1: Triton's interpreter "
                 "computes bfloat16 dot products wrongly; use float32/float16, or backend='torch'")
    check_logit_options(transform, grad_tolerance)


def check_fused(fused) -> None:
    _require(isinstance(fused, bool), f"fused must be True or False, got {fused!r}")


def check_workspace_bytes(workspace_bytes) -> None:
    _require(workspace_bytes is None or (isinstance(workspace_bytes, int) and not isinstance(workspace_bytes, bool)
                                         and workspace_bytes > 0),
             f"workspace_bytes must be None or a positive int (bytes), got {workspace_bytes!r}")


def checked_local_head(hidden, weight, targets, bias, ignore_index: int, backend: str | None,
                       transform: LogitTransform, grad_tolerance: float, workspace_bytes: int | None):
    """A local head's inputs as the computation takes them: (hidden, weight, targets, bias, backend), checked, with
    the labels widened and range-checked (a copy: see `checked_targets`), the backend resolved and, under autocast,
    the head cast to the autocast dtype (heads.autocast_head)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        require_tensor(name, value)
    require_tensor("bias", bias, optional=True)
    check_workspace_bytes(workspace_bytes)
    targets = widen_labels(targets)
    backend = resolve_backend(backend, hidden.device)
    hidden, weight, bias = autocast_head(hidden, weight, bias)
    check_logprob_metadata(hidden, weight, targets, bias, ignore_index, backend, transform=transform,
                           grad_tolerance=grad_tolerance)
    return hidden, weight, checked_targets(targets, weight.shape[0], ignore_index), bias, backend


def checked_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets") -> torch.Tensor:
    """A copy of `targets` once they are in [0, vocab_size) or ignore_index (else a ValueError naming `name`).

    Compute with the copy: in a compiled graph, that is what keeps the check from being dropped as dead code.
    """
    return _checked_targets_op(targets, int(vocab_size), int(ignore_index), name)


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets"):
    checked_targets(targets, vocab_size, ignore_index, name)


def widen_labels(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels of any width as int64 (what the kernels and torch's indexing take).

    uint8/int8/int16 labels would otherwise wrap ignore_index (-100 is 156 in uint8) or fail in torch.
    """
    if isinstance(labels, torch.Tensor) and labels.dtype != torch.int64 and not labels.is_floating_point() \
            and not labels.is_complex() and labels.dtype != torch.bool:
        return labels.long()
    return labels


def check_dpo_inputs(hidden_states, lm_head_weight, labels, lm_head_bias, *, ref_chosen_logps, ref_rejected_logps,
                     ref_hidden_states, ref_lm_head_weight, ref_lm_head_bias, reference_required: bool,
                     ignore_index: int, backend: str) -> torch.Tensor:
    """Checks FastDPOLoss's inputs; returns the labels widened to int64 (`widen_labels`) and checked against every
    head's vocabulary (a copy: see `checked_targets`)."""
    labels = widen_labels(labels)
    require_tensor("hidden_states", hidden_states)
    _require(hidden_states.dim() == 3,
             f"hidden_states must be a [2B, T, H] tensor (B chosen sequences, then B rejected), got shape "
             f"{_shape(hidden_states)}")
    num_seqs, seq_len = hidden_states.shape[:2]
    _require(num_seqs > 0 and seq_len > 0, f"empty batch: hidden_states has shape {_shape(hidden_states)}")
    _require(num_seqs % 2 == 0,
             f"hidden_states must hold an even number of sequences (chosen then rejected), got {num_seqs} "
             f"(shape {_shape(hidden_states)})")
    require_tensor("labels", labels)
    _require(labels.shape == hidden_states.shape[:2],
             f"labels must have shape {(num_seqs, seq_len)}, got {_shape(labels)}")
    policy = Names("hidden_states", "lm_head_weight", "labels", "lm_head_bias")
    labels = _check_head(hidden_states, lm_head_weight, labels, lm_head_bias, ignore_index, backend, policy)
    return _check_reference(hidden_states, lm_head_weight, labels, lm_head_bias, ref_chosen_logps, ref_rejected_logps,
                            ref_hidden_states, ref_lm_head_weight, ref_lm_head_bias, reference_required, ignore_index,
                            backend)


def _check_reference(hidden_states, lm_head_weight, labels, lm_head_bias, ref_chosen_logps, ref_rejected_logps,
                     ref_hidden_states, ref_lm_head_weight, ref_lm_head_bias, reference_required, ignore_index,
                     backend) -> torch.Tensor:
    """Checks the reference's inputs; returns `labels`, checked against the reference head's vocabulary if it has
    its own."""
    num_seqs, seq_len = hidden_states.shape[:2]
    has_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
    _require(not (has_logps and ref_hidden_states is not None),
             "pass either ref_chosen_logps/ref_rejected_logps (precomputed) or ref_hidden_states, not both: one "
             "of them would be ignored")
    _require(not reference_required or has_logps or ref_hidden_states is not None,
             "a reference is required unless reference_free=True: pass ref_chosen_logps and ref_rejected_logps, "
             "or ref_hidden_states")
    for name, t in (("ref_lm_head_weight", ref_lm_head_weight), ("ref_lm_head_bias", ref_lm_head_bias)):
        _require(t is None or ref_hidden_states is not None,
                 f"{name} is only used with ref_hidden_states, which is None: it would be ignored")
    _require(ref_lm_head_bias is None or ref_lm_head_weight is not None,
             "ref_lm_head_bias needs ref_lm_head_weight: without it the reference shares the policy's head "
             "(lm_head_weight and lm_head_bias), and ref_lm_head_bias would be ignored")
    # A reference that is given is checked even where the loss does not need one (it feeds the rewards).
    if has_logps:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            require_tensor(name, t, optional=True)
            _require(t is not None and t.shape == (num_seqs // 2,),
                     f"{name} must have shape ({num_seqs // 2},), got {None if t is None else _shape(t)}")
            _require(t.is_floating_point(), f"{name} must be floating point, got {t.dtype}")
        check_same_device(hidden_states=hidden_states, ref_chosen_logps=ref_chosen_logps,
                          ref_rejected_logps=ref_rejected_logps)
    elif ref_hidden_states is not None:
        require_tensor("ref_hidden_states", ref_hidden_states)
        _require(ref_hidden_states.dim() == 3 and ref_hidden_states.shape[:2] == hidden_states.shape[:2],
                 f"ref_hidden_states must have shape ({num_seqs}, {seq_len}, H), got {_shape(ref_hidden_states)}")
        if ref_lm_head_weight is None:  # the reference shares the policy's head
            names = Names("ref_hidden_states", "lm_head_weight", "labels", "lm_head_bias")
            weight, bias = lm_head_weight, lm_head_bias
        else:
            names = Names("ref_hidden_states", "ref_lm_head_weight", "labels", "ref_lm_head_bias")
            weight, bias = ref_lm_head_weight, ref_lm_head_bias
        if not is_distributed_head(ref_hidden_states, weight):  # else fastdpo.distributed checks it (see _check_head)
            check_logprob_metadata(ref_hidden_states, weight, labels, bias, ignore_index, backend, names=names)
            if ref_lm_head_weight is not None:
                labels = checked_targets(labels, ref_lm_head_weight.shape[0], ignore_index, names.targets)
        check_same_device(hidden_states=hidden_states, ref_hidden_states=ref_hidden_states)
    return labels


def _check_head(hidden, weight, labels, bias, ignore_index, backend, names):
    """The head's checks, and the labels checked against its vocabulary. A shard, DTensor or ZeRO-3
    partition is left to fastdpo.distributed, which checks it against the whole head (the local tensor
    is not [vocab, hidden])."""
    if is_distributed_head(hidden, weight):
        return labels
    check_logprob_metadata(hidden, weight, labels, bias, ignore_index, backend, names=names)
    return checked_targets(labels, weight.shape[0], ignore_index, names.targets)
