"""One adapter per implementation, all computing the same sigmoid DPO loss from the same inputs.

Common signature: `make_<impl>(inp, case) -> (run, note)`. `inp` holds leaf tensors `hidden` [2B, T, H] and
`weight` [V, H] (both requiring grad), HF-convention `labels` [2B, T], the pre-shifted `targets` [2B, T] (for
peers that do not shift: targets[:, t] = labels[:, t + 1]) and zero reference log-probs. `run()` returns the
scalar loss; the harness calls backward and reads `hidden.grad` / `weight.grad`. Building modules and importing
packages happens in `make_*`, outside the timed region. A peer that is not installed, or cannot express the
case (e.g. no softcap), raises `Skip`; anything else it raises becomes an `error:` row.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .inputs import BETA, IGNORE_INDEX, transform
from .measure import SPARSE_TOLERANCE, Skip, sequence_sums, sigmoid_dpo


INSTALL_HINT = 'pip install -e ".[bench]"'


def _import_peer(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # missing package, or a dependency such as triton that is missing
        raise Skip(f"{pip_name} not importable ({exc}); {INSTALL_HINT} installs the peers") from exc


def _loss(token_logps, inp):
    seq = sequence_sums(token_logps, inp["targets"])
    return sigmoid_dpo(seq, inp["ref_chosen_logps"], inp["ref_rejected_logps"], BETA)


# fastdpo_lean: README's smallest-memory setting ("Memory"), measured against Cut Cross-Entropy's memory: the
# two-pass path with a LEAN_WORKSPACE_BYTES d_logits workspace; change the setting here and in README together.
LEAN_FUSED = False
LEAN_WORKSPACE_BYTES = 32 << 20


def _fastdpo_loss(inp, case, **options):
    # Our own library: failing to import it is an error, never a skip
    import fastdpo

    # The backend is named, not left to the default, so that the row says which code ran: PyTorch tiles on a CPU
    # (fastdpo/chunked.py), the Triton kernels on a GPU.
    backend = "triton" if inp["hidden"].device.type == "cuda" else "torch"
    refs = {"ref_chosen_logps": inp["ref_chosen_logps"], "ref_rejected_logps": inp["ref_rejected_logps"]}
    loss_fn = fastdpo.FastDPOLoss(beta=BETA, loss_type="sigmoid", softcap=case.softcap, backend=backend, **options)
    path = "Triton kernels" if backend == "triton" else "PyTorch tiles, not the Triton kernels"
    described = "".join(f", {k}={v!r}" for k, v in options.items())
    return (lambda: loss_fn(inp["hidden"], inp["weight"], inp["labels"], **refs).loss), (
        f"FastDPOLoss(backend={backend!r}{described}): {path}")


def make_fastdpo(inp, case):
    """The default: fused=True (the fused route for a trainable head, the frozen route or two-pass for a frozen one)."""
    return _fastdpo_loss(inp, case)


def make_fastdpo_2pass(inp, case):
    return _fastdpo_loss(inp, case, fused=False)


def make_fastdpo_lean(inp, case):
    return _fastdpo_loss(inp, case, fused=LEAN_FUSED, workspace_bytes=LEAN_WORKSPACE_BYTES)


def make_fastdpo_tol(inp, case, tolerance: float = SPARSE_TOLERANCE):
    """fastdpo with grad_tolerance (the budgeted sparse backward): FastDPOLoss where it takes the argument, else
    linear_logprobs and the harness's own sigmoid DPO loss (the same loss, the same log-prob kernels)."""
    import inspect

    import fastdpo

    backend = "triton" if inp["hidden"].device.type == "cuda" else "torch"
    if "grad_tolerance" in inspect.signature(fastdpo.FastDPOLoss).parameters:
        refs = {"ref_chosen_logps": inp["ref_chosen_logps"], "ref_rejected_logps": inp["ref_rejected_logps"]}
        loss_fn = fastdpo.FastDPOLoss(beta=BETA, loss_type="sigmoid", softcap=case.softcap, backend=backend,
                                      grad_tolerance=tolerance)
        return (lambda: loss_fn(inp["hidden"], inp["weight"], inp["labels"], **refs).loss), (
            f"FastDPOLoss(backend={backend!r}, grad_tolerance={tolerance:g})")

    def run():
        logp = fastdpo.linear_logprobs(inp["hidden"], inp["weight"], inp["targets"], ignore_index=IGNORE_INDEX,
                                       softcap=case.softcap, backend=backend, grad_tolerance=tolerance)
        return _loss(logp, inp)

    return run, f"linear_logprobs(backend={backend!r}, grad_tolerance={tolerance:g}) + sigmoid DPO"


def make_naive(inp, case):
    """Full [2B, T, V] logits in the input dtype, an fp32 copy, log-softmax, gather (TRL before its fused head)."""

    def run():
        logits = transform(F.linear(inp["hidden"], inp["weight"]).float(), case.softcap)
        logp = logits.log_softmax(-1).gather(-1, inp["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return _loss(logp, inp)

    return run, "full logits, fp32 log-softmax"


def make_trl(inp, case):
    mod = _import_peer("trl.kernels.chunked_logprob", "trl")
    fn = getattr(mod, "ChunkedLogProbFunction", None) or getattr(mod, "_ChunkedLogProbFunction")
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768
    h, targets = inp["hidden"], inp["targets"]
    # TRL's own wrapper (`add_fused_lm_head`) scores only the labelled rows on Triton devices, all rows elsewhere
    compact = h.device.type == "cuda"

    def run():
        flat_h, flat_t = h.flatten(0, 1), targets.flatten()
        mask = flat_t != IGNORE_INDEX
        if compact:
            logp = fn.apply(flat_h[mask], inp["weight"], None, flat_t[mask], 1.0, chunk, case.softcap, 1.0, ())[0]
            logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        else:
            logp = fn.apply(flat_h, inp["weight"], None, flat_t.clamp(min=0), 1.0, chunk, case.softcap, 1.0, ())[0]
        return _loss(logp.view(targets.shape), inp)

    return run, f"ChunkedLogProbFunction, chunk {chunk}, log-probs only"


def make_liger(inp, case):
    if case.softcap is not None:
        raise Skip("LigerFusedLinearDPOLoss has no final-logit softcap")
    mod = _import_peer("liger_kernel.chunked_loss", "liger-kernel")
    # Liger's default is torch.compile'd chunks; on CPU compiling takes longer than the whole quick run
    compiled = inp["hidden"].device.type == "cuda"
    # use_ref_model=False: its reference log-probs are then 0, as for everyone here (it cannot take precomputed ones)
    loss_fn = mod.LigerFusedLinearDPOLoss(beta=BETA, compiled=compiled, use_ref_model=False, average_log_prob=False)
    return (lambda: loss_fn(inp["weight"], inp["hidden"], inp["targets"])[0]), (
        "compiled" if compiled else "eager (compiled=False)")


def make_cce(inp, case):
    mod = _import_peer("cut_cross_entropy", "cut-cross-entropy")
    impl = "cce" if inp["hidden"].device.type == "cuda" else "torch_compile"  # its Triton kernels need a GPU

    def run():
        nll = mod.linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], ignore_index=IGNORE_INDEX,
                                       softcap=case.softcap, reduction="none", impl=impl)
        return _loss(-nll, inp)

    return run, f"impl={impl}"


def make_torch_lce(inp, case):
    if not hasattr(F, "linear_cross_entropy"):
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
    if case.softcap is not None:
        raise Skip("F.linear_cross_entropy has no final-logit softcap")
    options = torch.nn.LinearCrossEntropyOptions()  # chunked path, chunk size and accumulation chosen by torch

    def run():
        flat_h, flat_t = inp["hidden"].flatten(0, 1), inp["targets"].flatten()
        nll = F.linear_cross_entropy(flat_h, inp["weight"], flat_t, reduction="none", ignore_index=IGNORE_INDEX,
                                     options=options)
        return _loss(-nll.view(inp["targets"].shape), inp)

    return run, "LinearCrossEntropyOptions() (auto chunking)"


IMPLS = {
    "fastdpo": make_fastdpo,
    "fastdpo_2pass": make_fastdpo_2pass,
    "fastdpo_lean": make_fastdpo_lean,
    "fastdpo_tol": make_fastdpo_tol,
    "naive": make_naive,
    "trl": make_trl,
    "liger": make_liger,
    "cce": make_cce,
    "torch_lce": make_torch_lce,
}

# What run.py measures unless --impls names others: fastdpo's other settings are asked for by name.
SETTINGS = ("fastdpo_2pass", "fastdpo_lean")
DEFAULT_IMPLS = tuple(name for name in IMPLS if name not in SETTINGS)

# Distribution names for results.json "versions"
PACKAGES = ("fastdpo", "torch", "triton", "trl", "transformers", "liger-kernel", "cut-cross-entropy")


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if out["fastdpo"] == "not installed":  # running from a source checkout
        try:
            out["fastdpo"] = getattr(importlib.import_module("fastdpo"), "__version__", "source checkout")
        except Exception as exc:  # noqa: BLE001 - a broken checkout is still worth a version string
            out["fastdpo"] = f"not importable ({type(exc).__name__})"
    return out
