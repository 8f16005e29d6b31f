"""Input checks: every bad input becomes a ValueError naming the argument and what was expected.

The kernels index W only through tile columns, so an out-of-range label could never make them read
out of bounds; it would silently give a wrong log-prob instead, which is why labels are checked here.
"""

from __future__ import annotations

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    _require(len(set(devices.values())) <= 1, f"all tensors must be on one device, got {devices}")


def check_logprob_inputs(hidden, weight, targets, bias, ignore_index: int, backend: str, *, temperature=1.0,
                         softcap=None, grad_filter_eps=0.0) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(hidden.dim() >= 1, "hidden must have a trailing hidden dimension")
    _require(weight.dim() == 2, f"weight must be [vocab, hidden], got shape {_shape(weight)}")
    _require(hidden.shape[-1] == weight.shape[1],
             f"hidden size mismatch: hidden has {hidden.shape[-1]} features, weight expects {weight.shape[1]}")
    _require(weight.shape[0] > 0, "weight must have at least one vocabulary row")
    _require(targets.shape == hidden.shape[:-1],
             f"targets must have shape {_shape(hidden)[:-1]} (hidden without its last dim), got {_shape(targets)}")
    _require(not targets.is_floating_point() and targets.dtype != torch.bool,
             f"targets must be an integer tensor, got {targets.dtype}")
    _require(hidden.is_floating_point(), f"hidden must be floating point, got {hidden.dtype}")
    _require(weight.dtype == hidden.dtype, f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        _require(bias.shape == (weight.shape[0],), f"bias must have shape ({weight.shape[0]},), got {_shape(bias)}")
        _require(bias.dtype == hidden.dtype, f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if backend == "triton":
        _require(hidden.dtype in TRITON_DTYPES,
                 f"backend='triton' supports {TRITON_DTYPES} inputs, got {hidden.dtype}; use backend='torch'")
    _require(temperature > 0, f"temperature must be > 0, got {temperature}")
    _require(softcap is None or softcap > 0, f"softcap must be None or > 0, got {softcap}")
    _require(0 <= grad_filter_eps < 1, f"grad_filter_eps must be in [0, 1), got {grad_filter_eps}")
    check_targets_in_range(targets, weight.shape[0], ignore_index)


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets"):
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][:5].tolist()
        raise ValueError(f"{name} must be in [0, {vocab_size}) or ignore_index={ignore_index}; found {bad}")


def check_dpo_inputs(hidden_states, labels, *, ref_chosen_logps, ref_rejected_logps, ref_hidden_states,
                     reference_required: bool) -> None:
    _require(isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3,
             "hidden_states must be a [2B, T, H] tensor (B chosen sequences, then B rejected)")
    num_seqs, seq_len = hidden_states.shape[:2]
    _require(num_seqs > 0 and seq_len > 0, f"empty batch: hidden_states has shape {_shape(hidden_states)}")
    _require(num_seqs % 2 == 0,
             f"hidden_states must hold an even number of sequences (chosen then rejected), got {num_seqs}")
    _require(isinstance(labels, torch.Tensor) and labels.shape == hidden_states.shape[:2],
             f"labels must have shape {(num_seqs, seq_len)}, got {getattr(labels, 'shape', type(labels).__name__)}")
    has_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
    _require(not reference_required or has_logps or ref_hidden_states is not None,
             "a reference is required unless reference_free=True: pass ref_chosen_logps and ref_rejected_logps, "
             "or ref_hidden_states")
    # A reference that is given is checked even where the loss does not need one (it feeds the rewards).
    if has_logps:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            _require(t is not None and t.shape == (num_seqs // 2,),
                     f"{name} must have shape ({num_seqs // 2},), got {None if t is None else _shape(t)}")
        check_same_device(hidden_states=hidden_states, ref_chosen_logps=ref_chosen_logps,
                          ref_rejected_logps=ref_rejected_logps)
    elif ref_hidden_states is not None:
        _require(ref_hidden_states.dim() == 3 and ref_hidden_states.shape[:2] == hidden_states.shape[:2],
                 f"ref_hidden_states must have shape ({num_seqs}, {seq_len}, H), got {_shape(ref_hidden_states)}")
