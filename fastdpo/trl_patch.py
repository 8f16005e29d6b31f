"""Run TRL's `DPOTrainer` on fastdpo's kernels: `fastdpo.patch_trl()` / `fastdpo.unpatch_trl()`.

TRL (>= 1.15) gives the policy and the reference model a *fused LM head* (`trl.trainer.utils.add_fused_lm_head`):
`model(..., labels=labels, fused_lm_head=True)` runs the backbone, shifts the labels and calls
`_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
outputs)`, which returns `(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)` per token. Everything else
(reference log-probs, f-divergences, every loss type, `loss_weights`, WPO weights, `ld_alpha`, metrics) is computed
by TRL from those per-token outputs.

The patch replaces the per-token head that DPOTrainer's fused heads call, and wraps `DPOTrainer._compute_loss` for
the loss route below. It swaps `trl.trainer.dpo_trainer.add_fused_lm_head` (the name `DPOTrainer.__init__`
calls) for a copy of TRL's own function whose module globals differ in two names only:

* `_ChunkedLogProbFunction` -> `_FastDPOLogProbHead`, same `apply` signature and outputs, backed by
  `fastdpo.linear_logprobs(..., with_stats=True)`;
* `_use_triton` (only used there to decide whether to score just the labelled positions) -> also true on CPU while
  patched, so prompt and padding positions are never projected (TRL scores every position on CPU). Masked positions
  are zero either way.

Two routes. Which one a patched DPOTrainer's step takes:

* **Loss route**: a training step with gradients, on a TRL version and loss types listed in `LOSS_ROUTE_CHECKED` (the
  ones tests/test_trl_patch.py and tests/test_trl_loss_route.py check against fastdpo.losses: TRL 1.16.0, every
  pair-local loss type), a configuration `fastdpo.losses.LossConfig.from_trl` accepts and whose loss is pair-local,
  `torch_compile` off; and at the policy's head call, a plain local head (on the 'torch' or 'triton' backend, as the
  head route would resolve it) whose pairs fit the fused pass's workspace, given the completion tokens of [chosen;
  rejected] rows. `DPOTrainer._compute_loss` (swapped on the class while patched) first computes the reference
  sequence log-probs (TRL's `compute_ref_log_probs`, with the `ref_model`, or the policy with its adapter disabled)
  unless they are precomputed, then runs TRL's own `_compute_loss` as if they were precomputed: TRL's loss math and
  every metric it logs stay TRL's code. The policy's head call finds a thread-local loss context
  (LossConfig.from_trl(args), the reference log-probs, the completion mask) and runs
  `fastdpo.fused_pass.fused_token_pass`: the head route's log-probs and statistics, bit for bit, with dX, dW (db)
  formed in the forward from fastdpo's loss gradient g per token. Its backward receives TRL's actual gradient w.r.t.
  the token log-probs; if it is s·g for a scalar s (1/gradient_accumulation_steps, say; to PREDICTION_RTOL of its
  largest entry) it returns s·dX, s·dW; otherwise TRL's loss math differs from fastdpo's: it recomputes TRL's exact
  gradient with the two-pass backward and warns once. Gradients are always TRL's. Passes over n·H·V for a step with a
  reference model and a trainable head: 4 (reference 1, policy 3), against 5 on the head route.
* **Head route**: everything else (evaluation; another TRL version or loss type, with a one-time warning saying
  why; a head call the fused pass does not serve, also warned). TRL computes everything from fastdpo's per-token
  head, as described above.

Besides the loss route's ordering of the reference forward, everything else — the backbone call, shifting,
logit-scale/softcap config attributes, FSDP2 DTensor heads, ZeRO-3 gathering for the forward, PEFT, MoE aux loss, `FusedCausalLMOutput` — is TRL's own code. A ZeRO-3 head reaches
`fastdpo.linear_logprobs` as the partitioned parameter (gathered by TRL for the forward), which gathers it again for
its backward, as TRL's own head does. Other trainers (SFT, GRPO, KTO, ...) are
untouched. The swap is decided on every head call: after `unpatch_trl()` every fused head, including those of
trainers built while patched, calls TRL's stock function again, and `DPOTrainer._compute_loss` is TRL's again.
"""

from __future__ import annotations

import functools
import importlib
import threading
import types
import warnings

import torch

__all__ = ["SUPPORTED_TRL", "TESTED_TRL", "TRLVersionError", "patch_trl", "unpatch_trl", "is_trl_patched"]

#: TRL versions whose DPOTrainer uses the fused LM head this patch targets (it arrived in 1.15.0).
SUPPORTED_TRL = ">=1.15,<2"
#: The TRL version the test suite runs against.
TESTED_TRL = "1.16.0"

_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# The name `add_fused_lm_head` (and the forward it builds) looks the chunked head up by, in its module globals.
_HEAD_GLOBAL = "_ChunkedLogProbFunction"
# Since TRL 1.16 the fused forward scores every position (not only the labelled ones) unless `_use_triton(device)`.
_COMPACT_GLOBAL = "_use_triton"


class TRLVersionError(RuntimeError):
    """TRL is missing, or its version/layout is not one `patch_trl` supports."""


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.active = False
        self.dpo_module = None  # trl.trainer.dpo_trainer
        self.original_add = None  # TRL's add_fused_lm_head, as found in dpo_trainer's namespace
        self.patched_add = None  # our replacement, installed in dpo_trainer's namespace
        self.stock_head = None  # TRL's chunked log-prob function (utils._ChunkedLogProbFunction)
        self.stock_use_triton = None
        self.trainer_class = None  # trl's DPOTrainer
        self.stock_compute_loss = None  # its _compute_loss, as found
        self.warned = set()


_STATE = _State()


def _warn_once(key: str, message: str) -> None:
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# The replacement head
# --------------------------------------------------------------------------------------------------------------------


class _EntropyHasNoGradient(torch.autograd.Function):
    """Identity on the entropy that refuses to backpropagate.

    TRL's head makes the entropy differentiable; fastdpo's stats carry no gradient. DPOTrainer only logs the entropy
    (detached), so this never fires there; it turns a silently missing gradient into a clear error for anyone who
    backpropagates through `outputs.entropy` of a patched model. An all-zero gradient is not a use of the entropy:
    DDP with find_unused_parameters (its output sink) and compiled graphs hand every output a gradient, zeros for
    the unused ones, and that must pass.
    """

    @staticmethod
    def forward(ctx, entropy, anchor):
        ctx.set_materialize_grads(False)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad is None or torch.compiler.is_compiling() or not bool(grad.ne(0).any()):
            return None, None
        raise RuntimeError(
            "fastdpo.patch_trl(): the patched fused LM head does not propagate gradients through `entropy` "
            "(DPOTrainer only logs it). Call fastdpo.unpatch_trl() before building a trainer that trains on the "
            "entropy."
        )


def _stock_reason(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why this call must go to TRL's stock head, or None.

    A DeepSpeed ZeRO-3 head is fastdpo's: TRL gathers it around the forward, and fastdpo.linear_logprobs gathers it
    again for its backward (fastdpo.distributed).
    """
    if hidden.device.type not in ("cpu", "cuda"):
        return f"device type {hidden.device.type!r}"
    return None


class _FastDPOLogProbHead:
    """Drop-in for TRL's `ChunkedLogProbFunction` inside DPOTrainer's fused heads (only `apply` is used)."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=("log_probs",) + _OPTIONAL_OUTPUTS,
    ):
        stock = _STATE.stock_head
        reason = _stock_reason(hidden, weight) if _STATE.active else None
        if _STATE.active and reason is None:
            return _fastdpo_head(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                                 outputs)
        if reason is not None:
            if stock is None:
                raise RuntimeError(f"fastdpo.patch_trl(): {reason} is not supported and TRL's own head is unavailable")
            _warn_once(reason, f"fastdpo.patch_trl(): {reason}; using TRL's own chunked log-prob head for it.")
        return stock.apply(
            hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
        )


def _fastdpo_head(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    fastdpo = importlib.import_module(__package__ or "fastdpo")
    linear_logprobs = fastdpo.linear_logprobs

    device_type = hidden.device.type
    # TRL's dtype rule: the projection runs in the autocast dtype when autocast is on, else in the hidden states'
    # dtype; the head weights are cast to it. fastdpo then runs outside autocast on same-dtype inputs.
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # .to returns the tensor itself when no cast is needed
    b = None if bias is None else bias.to(compute_dtype)
    with_stats = any(name in outputs for name in _OPTIONAL_OUTPUTS)
    kwargs = dict(temperature=float(temperature), softcap=softcap, logit_scale=float(logit_scale))
    context, _LOSS_CONTEXT.current = getattr(_LOSS_CONTEXT, "current", None), None  # the policy's call only
    with torch.autocast(device_type, enabled=False):
        result = None if context is None else _loss_route_head(context, h, w, b, targets, with_stats, kwargs)
        if result is None:
            result = linear_logprobs(h, w, targets, b, with_stats=with_stats, **kwargs)

    if not with_stats:
        return result.float(), None, None, None, None
    logps, entropy, log_sum_sq_probs, mean_logits, is_top1 = result
    if "entropy" in outputs:
        entropy = entropy.detach().float()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            anchor = next(t for t in (hidden, weight, bias) if t is not None and t.requires_grad)
            entropy = _EntropyHasNoGradient.apply(entropy, anchor)
    else:
        entropy = None
    log_sum_sq_probs = log_sum_sq_probs.detach().float() if "log_sum_sq_probs" in outputs else None
    mean_logits = mean_logits.detach().float() if "mean_logits" in outputs else None
    is_top1 = is_top1.detach().bool() if "is_top1" in outputs else None
    return logps.float(), entropy, log_sum_sq_probs, mean_logits, is_top1


def _use_triton_while_patched(device) -> bool:
    """`compact` in TRL's fused forward: score only labelled positions on CPU too while patched."""
    if _STATE.active and torch.device(device).type == "cpu":
        return True
    return _STATE.stock_use_triton(device)


# --------------------------------------------------------------------------------------------------------------------
# The loss route
# --------------------------------------------------------------------------------------------------------------------

#: TRL versions whose DPO loss math (DPOTrainer._compute_loss) tests/test_trl_loss_route.py checks against
#: fastdpo.losses, and the loss types it checks on each. Only these take the loss route; a new TRL version is
#: added here once the parity tests pass on it.
LOSS_ROUTE_CHECKED = {
    "1.16.0": frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                         "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}),
}
#: How far TRL's gradient w.r.t. the token log-probs may lie from a multiple s of fastdpo's, relative to its largest
#: entry, before the loss route recomputes TRL's exact gradient (float32 round-off of two evaluations of one formula).
PREDICTION_RTOL = 1e-5

SECOND_BACKWARD_MESSAGE = (
    "fastdpo.patch_trl(): the loss route hands the policy head's gradients over at the first backward, so the loss "
    "cannot be backpropagated twice (retain_graph=True); call fastdpo.unpatch_trl() for that.")

_LOSS_CONTEXT = threading.local()  # .current: the _LossContext the policy's next head call consumes


class _LossContext:
    """What the policy's fused head needs to form fastdpo's loss gradient in its forward."""

    def __init__(self, config, ref_chosen_logps, ref_rejected_logps, completion_mask):
        self.config, self.ref_chosen_logps, self.ref_rejected_logps = config, ref_chosen_logps, ref_rejected_logps
        self.mask = completion_mask[..., 1:].bool()  # TRL's `labels != -100` after the shift


def _loss_route_config(trainer):
    """(fastdpo's LossConfig for this DPOTrainer's step, None) on the loss route, else (None, why not): '' for
    steps without gradients (evaluation), which need no warning."""
    if not (torch.is_grad_enabled() and trainer.model.training):
        return None, ""
    if getattr(trainer.args, "torch_compile", False):
        return None, "the model is compiled (DPOConfig(torch_compile=True)), and compiled graphs take the head route"
    import trl

    version = str(getattr(trl, "__version__", None))
    checked = LOSS_ROUTE_CHECKED.get(version)
    if checked is None:
        return None, (f"TRL {version}'s DPO loss math has not been checked against fastdpo's (checked: TRL "
                      f"{', '.join(sorted(LOSS_ROUTE_CHECKED))})")
    unchecked = sorted(set(trainer.loss_types) - checked)
    if unchecked:
        return None, f"loss type(s) {unchecked} have not been checked against fastdpo's on TRL {version}"
    losses = importlib.import_module(f"{__package__ or 'fastdpo'}.losses")
    try:
        config = losses.LossConfig.from_trl(trainer.args)
    except ValueError as exc:
        return None, f"fastdpo.losses does not take this configuration ({exc})"
    if not config.pair_local:
        return None, f"the loss {list(config.loss_type)} couples pairs (fastdpo.losses.LossConfig.pair_local)"
    return config, None


def _compute_loss_loss_route(self, model, inputs, return_outputs):
    """DPOTrainer._compute_loss while patched: TRL's own, with the reference log-probs computed first (TRL's
    compute_ref_log_probs) and the policy's head handed the loss context (see the module docstring)."""
    stock = _STATE.stock_compute_loss
    config, refusal = _loss_route_config(self) if _STATE.active else (None, "")
    if config is None:
        if refusal:
            _warn_once(refusal, f"fastdpo.patch_trl(): {refusal}; this DPOTrainer takes the head route (TRL's loss, "
                                "fastdpo's per-token head).")
        return stock(self, model, inputs, return_outputs)
    inputs = dict(inputs)
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_model = self.ref_model if self.ref_model is not None else self.model  # PEFT: the adapter is disabled
        ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen, ref_rejected
    precomputed = self.precompute_ref_logps
    _LOSS_CONTEXT.current = _LossContext(config, ref_chosen, ref_rejected, inputs["completion_mask"])
    self.precompute_ref_logps = True  # TRL's own loss and metrics, from the reference log-probs just computed
    try:
        return stock(self, model, inputs, return_outputs)
    finally:
        self.precompute_ref_logps = precomputed
        _LOSS_CONTEXT.current = None


def _patched_compute_loss():
    @functools.wraps(_STATE.stock_compute_loss)
    def _compute_loss(self, model, inputs, return_outputs):
        return _compute_loss_loss_route(self, model, inputs, return_outputs)

    _compute_loss.__fastdpo_patched__ = True
    return _compute_loss


def _loss_route_head(context: _LossContext, hidden, weight, bias, targets, with_stats: bool, transform_kwargs):
    """The policy's head call on the loss route: TokenStats (or log-probs) whose log-probs carry the gradients the
    fused pass formed; None when this call cannot take it (the head route then serves it)."""
    package = __package__ or "fastdpo"
    fused_pass = importlib.import_module(f"{package}.fused_pass")
    transform = importlib.import_module(f"{package}.transform").LogitTransform(**transform_kwargs)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return None
    reason, result = _head_refusal(context, hidden, targets, with_stats), None
    backend = importlib.import_module(f"{package}.backends").resolve_backend(None, hidden.device)
    if reason is None and not fused_pass.token_pass_route(hidden, weight, bias, backend=backend):
        reason = f"the fused pass does not serve this head (backend {backend!r}, a distributed head or compiling)"
    if reason is None:  # a plain local head: checked as the head route checks it
        hidden, weight, targets, bias, _ = importlib.import_module(f"{package}.validation").checked_local_head(
            hidden, weight, targets, bias, -100, backend, transform, 0.0, None)
        with torch.no_grad():
            result = fused_pass.fused_token_pass(
                context.config, hidden, weight, bias, targets, context.mask.to(targets.device), transform,
                with_stats=with_stats, workspace_bytes=None, ref_chosen_logps=context.ref_chosen_logps,
                ref_rejected_logps=context.ref_rejected_logps, backend=backend)
        reason = "a pair's logits do not fit the fused pass's workspace" if result is None else None
    if reason is not None:
        _warn_once(reason, f"fastdpo.patch_trl(): {reason}; this step's policy head takes the head route.")
        return None
    outputs, predicted, grads = result
    route = _PredictedGradients(predicted, grads, (hidden, weight, bias, targets, outputs[-1]), transform, backend)
    logps = _LossRouteLogProbs.apply(hidden, weight, bias, outputs[0], route)
    fields = importlib.import_module(f"{package}.types").TokenStats
    return fields(logps, *outputs[1:len(fields._fields)]) if with_stats else logps


def _head_refusal(context: _LossContext, hidden, targets, with_stats: bool) -> str | None:
    """Why the head call's inputs are not what the loss context describes, or None."""
    mask = context.mask
    if hidden.dim() != 2 or mask.shape[0] % 2 or targets.numel() != int(mask.sum()):
        return "the head was not given the completion tokens of [chosen; rejected] rows (padding-free, prompt tuning?)"
    if context.config.use_weighting and not with_stats:
        return "WPO needs log_sum_sq_probs, which the head was not asked for"
    return None


class _PredictedGradients:
    """dX, dW, db formed in the forward from fastdpo's per-token loss gradient `predicted`, and what the two-pass
    backward needs should TRL's actual gradient not be a multiple of it."""

    def __init__(self, predicted, grads, head, transform, backend: str):
        self.predicted, self.grads, self.head, self.transform, self.backend = predicted, grads, head, transform, backend

    def given(self, incoming: torch.Tensor, needed) -> tuple:
        scale, mismatch = predicted_scale(incoming, self.predicted)
        if scale is not None:
            return tuple(g if g is None or scale == 1.0 else g * scale for g in self.grads)
        _warn_once("loss route drift", (
            "fastdpo.patch_trl(): TRL's gradient w.r.t. the policy's token log-probs is not a multiple of the one "
            f"fastdpo.losses predicts (relative mismatch {mismatch:.2e} > {PREDICTION_RTOL:g}): TRL's loss math "
            "differs from fastdpo's for this configuration. The loss route fell back to TRL's exact gradient (the "
            "two-pass backward, one more pass over the head) and does so whenever this happens."))
        return self._two_pass(incoming, needed)

    def _two_pass(self, incoming, needed) -> tuple:
        hidden, weight, bias, targets, lse = self.head
        ops = importlib.import_module(f"{__package__ or 'fastdpo'}.ops")
        return ops.exact_backward(incoming.contiguous(), hidden, weight, bias, targets, lse, -100, self.transform,
                                  backend=self.backend, need=(needed[0], needed[1], needed[2] and bias is not None))


def predicted_scale(incoming: torch.Tensor, predicted: torch.Tensor) -> tuple[float | None, float]:
    """(s, mismatch): s with incoming = s * predicted to PREDICTION_RTOL of max |incoming| (None if there is
    none), and max |incoming - s * predicted| / max |incoming| for the least-squares s."""
    incoming, predicted = incoming.reshape(-1).double(), predicted.reshape(-1).double()
    norm = float(predicted.dot(predicted))
    scale = float(incoming.dot(predicted)) / norm if norm > 0 else 0.0
    largest = float(incoming.abs().max()) if incoming.numel() else 0.0
    error = float((incoming - scale * predicted).abs().max()) if incoming.numel() else 0.0
    mismatch = error / largest if largest > 0 else 0.0
    ok = error <= PREDICTION_RTOL * largest + torch.finfo(torch.float32).tiny
    return (scale if ok else None), mismatch


class _LossRouteLogProbs(torch.autograd.Function):
    """The policy's token log-probs; the backward checks TRL's incoming gradient against the prediction."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, logps, route):
        ctx.route = route
        return logps.clone()

    @staticmethod
    def backward(ctx, grad):
        ops = importlib.import_module(f"{__package__ or 'fastdpo'}.ops")
        if torch.is_grad_enabled():
            raise RuntimeError(ops.DOUBLE_BACKWARD_MESSAGE)
        if ctx.route is None:
            raise RuntimeError(SECOND_BACKWARD_MESSAGE)
        route, ctx.route = ctx.route, None  # handed over, not kept (see fused_pass._AttachGradients)
        needed = ctx.needs_input_grad[:3]
        grads = route.given(grad, needed)
        return (*(g if wanted else None for g, wanted in zip(grads, needed)), None, None)


# --------------------------------------------------------------------------------------------------------------------
# Installing and removing the patch
# --------------------------------------------------------------------------------------------------------------------


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _check_trl():
    """Import TRL and check that it is a supported version with the expected layout; return its modules."""
    try:
        import trl
    except ImportError as exc:
        raise TRLVersionError(
            f"fastdpo.patch_trl() needs TRL {SUPPORTED_TRL} (tested with {TESTED_TRL}); TRL is not installed. "
            f"Install it with `pip install 'trl=={TESTED_TRL}'` or `pip install 'fastdpo[trl]'`."
        ) from exc
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = getattr(trl, "__version__", None)
    try:
        version = Version(str(found))
    except InvalidVersion:
        version = None
    if version is None or not SpecifierSet(SUPPORTED_TRL).contains(version, prereleases=True):
        raise TRLVersionError(
            f"fastdpo.patch_trl() supports TRL {SUPPORTED_TRL} (tested with {TESTED_TRL}), found TRL {found}. "
            "Older TRL computes DPO log-probs without the fused LM head this patch replaces; "
            f"install `trl=={TESTED_TRL}` or use fastdpo.FastDPOLoss directly."
        )
    try:
        dpo_module = importlib.import_module("trl.trainer.dpo_trainer")
        utils_module = importlib.import_module("trl.trainer.utils")
    except ImportError as exc:
        raise TRLVersionError(f"fastdpo.patch_trl(): cannot import TRL's DPO trainer ({exc})") from exc
    original = getattr(utils_module, "add_fused_lm_head", None)
    if (
        not isinstance(original, types.FunctionType)
        or not hasattr(utils_module, _HEAD_GLOBAL)
        or _HEAD_GLOBAL not in _code_names(original.__code__)
    ):
        raise TRLVersionError(
            f"fastdpo.patch_trl(): TRL {found} does not have the fused LM head layout this patch expects "
            "(trl.trainer.utils.add_fused_lm_head calling _ChunkedLogProbFunction); supported: "
            f"TRL {SUPPORTED_TRL}, tested {TESTED_TRL}."
        )
    if not hasattr(dpo_module, "add_fused_lm_head"):
        raise TRLVersionError(f"fastdpo.patch_trl(): TRL {found}'s DPOTrainer does not use add_fused_lm_head.")
    return dpo_module, utils_module


def _build_patched_add(original: types.FunctionType, utils_module):
    @functools.wraps(original)
    def add_fused_lm_head(model, *args, **kwargs):
        # Snapshot TRL's utils globals now (so later changes to them are seen by heads built later) and swap the two
        # names; the forward TRL builds inside closes over these globals.
        namespace = dict(vars(utils_module))
        namespace[_HEAD_GLOBAL] = _FastDPOLogProbHead
        if _COMPACT_GLOBAL in namespace:
            namespace[_COMPACT_GLOBAL] = _use_triton_while_patched
        fn = types.FunctionType(
            original.__code__, namespace, original.__name__, original.__defaults__, original.__closure__
        )
        fn.__kwdefaults__ = original.__kwdefaults__
        return fn(model, *args, **kwargs)

    add_fused_lm_head.__fastdpo_patched__ = True
    return add_fused_lm_head


class _PatchHandle:
    """Returned by `patch_trl()`; as a context manager it restores the state from before the call on exit."""

    def __init__(self, was_patched: bool):
        self._was_patched = was_patched

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._was_patched:
            unpatch_trl()
        return False

    def __repr__(self):
        return f"<fastdpo TRL patch ({'active' if _STATE.active else 'inactive'})>"


def patch_trl() -> _PatchHandle:
    """Make TRL's `DPOTrainer` compute policy and reference log-probs with fastdpo's kernels.

    Applies to trainers built after the call (their fused LM heads consult the patch state on every call).
    Idempotent; reversed by `unpatch_trl()`. Also a context manager: `with fastdpo.patch_trl(): ...` undoes the patch
    on exit unless it was already active before. Raises `TRLVersionError` if TRL is missing or unsupported.
    """
    with _STATE.lock:
        if _STATE.active:
            return _PatchHandle(was_patched=True)
        dpo_module, utils_module = _check_trl()
        fastdpo = importlib.import_module(__package__ or "fastdpo")
        if not callable(getattr(fastdpo, "linear_logprobs", None)):
            raise RuntimeError("fastdpo.patch_trl(): fastdpo.linear_logprobs is not available in this build")
        current = dpo_module.add_fused_lm_head
        if getattr(current, "__fastdpo_patched__", False):
            current = current.__wrapped__  # left behind by a reloaded fastdpo; never wrap twice
        original = utils_module.add_fused_lm_head
        if current is not original:
            raise TRLVersionError(
                "fastdpo.patch_trl(): trl.trainer.dpo_trainer.add_fused_lm_head is not TRL's own function (already "
                "patched by another library?); refusing to stack patches."
            )
        _STATE.dpo_module = dpo_module
        _STATE.original_add = original
        _STATE.stock_head = utils_module._ChunkedLogProbFunction
        _STATE.stock_use_triton = getattr(utils_module, _COMPACT_GLOBAL, None)
        _STATE.patched_add = _build_patched_add(original, utils_module)
        dpo_module.add_fused_lm_head = _STATE.patched_add
        trainer_class = getattr(dpo_module, "DPOTrainer", None)
        stock_compute_loss = getattr(trainer_class, "__dict__", {}).get("_compute_loss")
        if stock_compute_loss is not None and hasattr(trainer_class, "compute_ref_log_probs"):  # the loss route
            _STATE.trainer_class = trainer_class
            _STATE.stock_compute_loss = getattr(stock_compute_loss, "__wrapped__", stock_compute_loss)
            trainer_class._compute_loss = _patched_compute_loss()
        _STATE.active = True
        return _PatchHandle(was_patched=False)


def unpatch_trl() -> None:
    """Undo `patch_trl()`: TRL's DPOTrainer is stock again (including trainers built while patched). Idempotent."""
    with _STATE.lock:
        if not _STATE.active:
            return
        _STATE.active = False
        module = _STATE.dpo_module
        trainer_class = _STATE.trainer_class
        if trainer_class is not None and getattr(trainer_class.__dict__.get("_compute_loss"), "__fastdpo_patched__",
                                                 False):
            _STATE.trainer_class._compute_loss = _STATE.stock_compute_loss
        if module.add_fused_lm_head is _STATE.patched_add:
            module.add_fused_lm_head = _STATE.original_add
        else:
            warnings.warn(
                "fastdpo.unpatch_trl(): trl.trainer.dpo_trainer.add_fused_lm_head was replaced by someone else after "
                "fastdpo patched it; leaving that replacement in place (fastdpo's head is disabled).",
                RuntimeWarning,
                stacklevel=2,
            )


def is_trl_patched() -> bool:
    """Whether `patch_trl()` is currently active."""
    return _STATE.active
