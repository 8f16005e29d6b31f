"""Timing, peak memory, the float64 reference and relative errors.

Every implementation is measured the same way: one warm-up forward+backward (its gradients are the ones checked
against the reference; compilation and autotuning happen there), then the peak memory of one more run, then the
median time of several runs.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from typing import Callable

import torch

from .inputs import IGNORE_INDEX, shifted_targets, transform


class Skip(Exception):
    """An implementation that cannot run this case (not installed, unsupported feature): a `skipped:` row."""


# --- the loss every implementation computes ---------------------------------------------------------------------


def sequence_sums(token_logps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2B, T] per-token log-probs (any value at ignored positions) -> [2B] float32 sums over scored tokens."""
    return token_logps.float().masked_fill(targets == IGNORE_INDEX, 0.0).sum(-1)


def sigmoid_dpo(seq_logps: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float):
    """Mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); chosen rows come first."""
    chosen, rejected = seq_logps.chunk(2)
    logits = (chosen - ref_chosen.to(chosen.dtype)) - (rejected - ref_rejected.to(chosen.dtype))
    return -torch.nn.functional.logsigmoid(beta * logits).mean()


# --- float64 reference (chunked, so it also fits real heads at 64k tokens) ---------------------------------------


def _chunk_rows(vocab: int, budget_bytes: int) -> int:
    return max(1, budget_bytes // (vocab * 8 * 3))  # logits, probabilities, gradient tile in float64


@torch.no_grad()
def reference_fp64(inputs: dict, softcap: float | None, beta: float, budget_bytes: int = 1 << 30) -> dict:
    """Loss and gradients (hidden, weight) in float64, never holding more than ~budget_bytes of logits.

    Two passes over token chunks: log-probs -> sequence sums -> loss and dL/dsum (autograd on [2B] values), then
    the logits gradient g_t * (onehot - softmax) recomputed per chunk, through the softcap's derivative.
    """
    h = inputs["hidden"].to(torch.float64)
    w = inputs["weight"].to(torch.float64)
    targets = shifted_targets(inputs["labels"])
    n_seqs, seq_len, _ = h.shape
    flat_h, flat_t = h.flatten(0, 1), targets.flatten()
    rows = (flat_t != IGNORE_INDEX).nonzero().flatten()
    step = _chunk_rows(w.shape[0], budget_bytes)

    def logits(idx):
        return transform(flat_h[idx] @ w.T, softcap)

    token_logp = torch.zeros(flat_t.shape, dtype=torch.float64, device=h.device)
    for idx in rows.split(step):
        z = logits(idx)
        token_logp[idx] = z.gather(1, flat_t[idx, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    seq = token_logp.view(n_seqs, seq_len).sum(-1).requires_grad_(True)
    with torch.enable_grad():
        loss = sigmoid_dpo(seq, inputs["ref_chosen_logps"].double(), inputs["ref_rejected_logps"].double(), beta)
        (d_seq,) = torch.autograd.grad(loss, seq)
    g_tok = d_seq.repeat_interleave(seq_len)  # dL/dlogp for every flat position

    grad_h = torch.zeros_like(flat_h)
    grad_w = torch.zeros_like(w)
    for idx in rows.split(step):
        z = logits(idx)
        dz = -torch.softmax(z, dim=1)
        dz.scatter_add_(1, flat_t[idx, None], torch.ones_like(dz[:, :1]))
        dz *= g_tok[idx, None]
        if softcap is not None:
            dz *= 1 - (z / softcap) ** 2  # d/dx softcap*tanh(x/softcap)
        grad_h[idx] = dz @ w
        grad_w.addmm_(dz.T, flat_h[idx])
    return {"loss": loss.detach(), "grad_hidden": grad_h.view_as(h), "grad_weight": grad_w,
            "seq_logps": seq.detach()}


def rel_err(value: torch.Tensor | None, ref: torch.Tensor) -> float:
    """||value - ref|| / ||ref|| in float64 (inf when the implementation produced nothing)."""
    if value is None:
        return float("inf")
    # On the reference's device: the worker keeps the reference on the host, out of the GPU memory peers compete for
    ref = ref.to(torch.float64)
    denom = ref.norm().item()
    diff = (value.detach().to(ref.device, torch.float64) - ref).norm().item()
    return diff / denom if denom > 0 else diff


def errors(loss: torch.Tensor, grad_hidden, grad_weight, ref: dict, frozen_head: bool = False) -> dict:
    """Relative errors of the loss and the gradients; a frozen head has no weight gradient to check."""
    out = {"loss": rel_err(loss, ref["loss"]), "hidden": rel_err(grad_hidden, ref["grad_hidden"])}
    if not frozen_head:
        out["weight"] = rel_err(grad_weight, ref["grad_weight"])
    return out


# --- one forward + backward -------------------------------------------------------------------------------------


def step(run: Callable[[], torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fresh gradients, then loss + backward: what a training step asks of the head."""
    hidden.grad = None
    weight.grad = None
    loss = run()
    loss.backward()
    return loss.detach()


# --- CPU: wall clock and resident memory ------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim or fix
        return None


def fix_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Serve allocations of nbytes or more that the heap has no free block for by mmap, unmapped when freed.

    glibc starts at this threshold (128 KiB) but raises it to the size of any mmap'd block that is freed, up
    to 32 MiB. After that, large buffers come from the heap too, and how much of a step's memory reads as new
    depends on the heap's history: one step of an earlier fastdpo (per-block buffers; quick case, V=65536,
    66.0 MiB of gradients) read 67.5 MiB in some processes and 68.3 in others. It is set after the timed runs:
    mmap'ing large buffers costs page faults that implementations allocating many would pay in time. Returns
    False where it cannot be set (not glibc).
    """
    libc = _libc()
    m_mmap_threshold = -3  # from <malloc.h>; setting it also turns the dynamic adjustment off
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(m_mmap_threshold, nbytes))


def _release_free_heap() -> None:
    # glibc keeps freed blocks resident; without trimming, a baseline read after the warm-up would include memory
    # the next run reuses for free, and the measured peak would be too low.
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_peak_rss() -> int:
    """Trim the heap, reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS in bytes."""
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def planned_runs(step_s: float, budget_s: float, min_runs: int, max_runs: int) -> int:
    """How many timed runs: as many as budget_s holds, between min_runs and max_runs.

    A step that alone takes more than budget_s gets one run (its spread is then unknown): the slow peers would
    otherwise spend minutes confirming that they are slow. The estimate is re-made after every run, so a warm-up
    that included compilation does not cut the count.
    """
    if step_s > budget_s:
        return 1
    return max(min_runs, min(max_runs, int(budget_s // max(step_s, 1e-9))))


def cpu_measure(run, hidden, weight, max_runs: int = 3, budget_s: float = 10.0, min_runs: int = 1,
                on_step=None) -> tuple[list[float], int]:
    """Timed runs after the caller's warm-up, then the peak memory of one more step.

    Timing: planned_runs() runs, with glibc as it comes. Memory: the peak RSS of one step above the baseline
    taken just before it, with the mmap threshold fixed afterwards (fix_mmap_threshold), so one step for every
    implementation whatever its speed, as on the GPU. on_step(done, planned, ms) is called after each timed run
    (progress reports). Returns (times in ms, peak bytes).
    """
    times: list[float] = []
    planned = max_runs
    while len(times) < planned:
        t0 = time.perf_counter()
        step(run, hidden, weight)
        times.append((time.perf_counter() - t0) * 1e3)
        planned = planned_runs(statistics.median(times) / 1e3, budget_s, min_runs, max_runs)
        if on_step is not None:
            on_step(len(times), max(planned, len(times)), times[-1])
    hidden.grad = weight.grad = None  # the step's new gradients count, as they do in the first step
    fix_mmap_threshold()
    base = reset_peak_rss()
    step(run, hidden, weight)
    return times, max(0, peak_rss() - base)


def spread(times_ms: list[float]) -> dict:
    """The row's timing fields: median (`ms`), min, max and the count of timed runs."""
    return {"ms": statistics.median(times_ms), "ms_min": min(times_ms), "ms_max": max(times_ms),
            "runs": len(times_ms)}


# --- GPU: CUDA events and the caching allocator's peak ----------------------------------------------------------


def cuda_peak_bytes(run, hidden, weight) -> int:
    """Peak allocated bytes of one forward+backward above what is allocated before it (inputs, weights)."""
    hidden.grad = None
    weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(run, hidden, weight)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cuda_times_ms(run, hidden, weight, rep_ms: int = 300) -> list[float]:
    """Every timed run of triton's do_bench (it picks the count to fill rep_ms), in ms."""
    import triton.testing

    times = triton.testing.do_bench(lambda: step(run, hidden, weight), warmup=50, rep=rep_ms, return_mode="all")
    return [float(t) for t in times]


def cublas_roofline_ms(hidden: torch.Tensor, weight: torch.Tensor, rows: int, chunk: int = 8192) -> float:
    """Time cuBLAS takes for the four [rows x H x V] products a fused head needs (forward, recompute, dX, dW).

    Chunked over tokens like the fused kernels themselves, so that the [rows, V] operand fits at 64k tokens.
    """
    import triton.testing

    h = hidden.flatten(0, 1)[:rows].detach()
    w = weight.detach()
    n = min(rows, chunk)
    dz = torch.randn(n, w.shape[0], device=w.device, dtype=w.dtype)
    z = torch.empty_like(dz)
    gh = torch.empty(n, w.shape[1], device=w.device, dtype=w.dtype)
    gw = torch.zeros_like(w)

    def four_products():
        for start in range(0, rows, n):
            hc = h[start:start + n]
            m = hc.shape[0]
            torch.mm(hc, w.T, out=z[:m])  # forward
            torch.mm(hc, w.T, out=z[:m])  # recompute in the backward
            torch.mm(dz[:m], w, out=gh[:m])  # dX
            gw.addmm_(dz[:m].T, hc)  # dW

    return triton.testing.do_bench(four_products, warmup=50, rep=300, return_mode="median")


# --- how much of the backward a gradient tolerance keeps ---------------------------------------------------------

SPARSE_TOLERANCE = 2.0**-10  # the tolerance of the CPU results; fastdpo_tol runs with it


@torch.no_grad()
def kept_fraction(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                  tolerance: float = SPARSE_TOLERANCE, chunk: int = 512) -> float:
    """Fraction of the (token block, vocabulary tile) pairs fastdpo's backward computes with grad_tolerance.

    Recomputed from the logits here with fastdpo's own planning function (fastdpo.sparse_plan) on the tiles of
    the path the device runs: on CPU the PyTorch tile path's blocks and slices (fastdpo/chunked.py), on CUDA
    the Triton kernels' tile (kernels.config); both budget each row's dropped mass.
    """
    from fastdpo import chunked, sparse_plan
    from fastdpo.kernels.config import device_capability, gemm_config

    targets = shifted_targets(labels).flatten()
    scored = (targets != IGNORE_INDEX).nonzero().flatten()
    if scored.numel() == 0:
        return 1.0
    h, w, targets = hidden.flatten(0, 1)[scored], weight, targets[scored]
    if hidden.device.type == "cuda":
        cfg = gemm_config(weight.dtype, device_capability(weight.device), weight.shape[1])
        block_m, bounds = cfg["BLOCK_M"], _even_slices(weight.shape[0], cfg["BLOCK_V"])
    else:
        block_m = chunked.TOKEN_BLOCK
        bounds = chunked.vocab_slices(weight.shape[0], max(1, min(block_m, scored.numel())))
    tile_lse = torch.cat([_tile_lse(h[i:i + chunk], w, softcap, bounds) for i in range(0, h.shape[0], chunk)], 1)
    lse = torch.logsumexp(tile_lse, dim=0)
    kept = sparse_plan.kept_pairs(tile_lse, lse, targets, block_m, bounds[0][1] - bounds[0][0], tolerance)
    return kept.float().mean().item()


def _even_slices(vocab: int, width: int) -> list[tuple[int, int]]:
    return [(v0, min(v0 + width, vocab)) for v0 in range(0, vocab, width)]


def _tile_lse(h, w, softcap, bounds) -> torch.Tensor:
    """[tiles, rows]: each vocabulary tile's logsumexp per row, in fp32."""
    z = transform(h.float() @ w.float().T, softcap)
    return torch.stack([torch.logsumexp(z[:, v0:v1], dim=1) for v0, v1 in bounds])
