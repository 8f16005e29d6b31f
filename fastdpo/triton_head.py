"""The Triton backend's head: the forward and the backward over the scored rows, on fastdpo.kernels.

Same shape as fastdpo.torch_head (fastdpo.ops dispatches to either with the same arguments; see there
for the signatures). The forward launches kernels/logprob_forward.py and merges its per-tile partials;
its backward plan (grad_tolerance > 0) is the per-tile logsumexp table, fp32 [vocabulary tiles of the
forward, tokens] (0 at ignored positions): with a row's lse it gives each tile's exact probability
mass, which the sparse backward budgets (fastdpo.sparse_plan).

The backward walks the vocabulary in chunks, d_logits in a bounded workspace, GEMMs.
For each chunk [c0, c1) of the vocabulary (C columns, a multiple of the forward's tile width):

    D        = logits_grad(X, W[c0:c1])        Triton: recompute the forward's tiles, write
                                              g (onehot - softmax) transform' into D [n, C]
    dX      += D @ W[c0:c1]                   cuBLAS, added into the fp32 accumulator [n, H] in its
                                              epilogue (accumulate_product)
    dW[c0:c1] = D^T @ X_scored                cuBLAS, written once in the weight's dtype
    db[c0:c1] = colsum(D)                     fp32

The workspace D is the only tile-sized buffer; its width comes from `workspace_bytes`
(config.vocab_chunk_width; by default config.default_chunk_width: C * min(n, H) >= 2^24), never
[tokens x vocab]. dX exists for the scored rows only (fp32,
n x H) and is scattered into the hidden states' shape at the end. No atomics: each dW row is written
once, dX is summed over chunks in a fixed order, so the gradients are bitwise reproducible (cuBLAS
picks a deterministic algorithm for a fixed shape; set CUBLAS_WORKSPACE_CONFIG as torch documents
when several streams run GEMMs at once). A frozen head skips the dW GEMM (and X_scored, unless the
recompute's persistent driver reads it: kernels/config.persistent_config); frozen hidden states skip
the dX GEMM. X_scored is gathered once per backward and serves both.

Cost at the Llama-3-8B head (n = 16,384, H = 4096, V = 128,256, bf16, the default chunk of 4,096
columns: 32 chunks, a 128 MiB workspace): recompute 2nVH + dX 2nVH + dW 2nVH = 51.6 TFLOP (64.5 ms at
800 TFLOP/s); beyond the GEMMs' own traffic, 3 x 4.2 GB of workspace writes and reads and 32 x 2 x
268 MB of fp32 dX reads and writes in the GEMMs' epilogues. Memory above the inputs (README, "Memory"):
dW, then the workspace, X_scored (128 MiB) and the fp32 dX of the scored rows (256 MiB) during the
chunks, then dX itself.
"""

from __future__ import annotations

import functools

import torch

from .kernels.config import (default_workspace_bytes, device_capability, gemm_config, persistent_config,
                             vocab_chunk_width)
from .softmax_stats import VocabPartials
from .sparse_plan import kept_pairs, pair_lists, tile_chunks
from .transform import LogitTransform


def backward_plan_like(hidden: torch.Tensor, weight: torch.Tensor, n_tokens: int, fake: bool = False) -> torch.Tensor:
    return (torch.empty if fake else torch.zeros)((forward_tiles(weight), n_tokens), dtype=torch.float32,
                                                  device=hidden.device)


def forward_tiles(weight: torch.Tensor) -> int:
    block_v = gemm_config(weight.dtype, device_capability(weight.device), weight.shape[1])["BLOCK_V"]
    return -(-weight.shape[0] // block_v)


def forward(hidden_2d, weight, bias, rows, targets, transform: LogitTransform, *, with_stats: bool,
            grad_tolerance: float, backward_plan: torch.Tensor) -> VocabPartials:
    from .kernels.logprob_forward import logprob_forward

    table, target_logit = logprob_forward(row_major(hidden_2d), row_major(weight), bias, rows, targets,
                                          transform=transform, with_stats=with_stats)
    if backward_plan.numel():  # each (vocabulary tile, row)'s logsumexp
        backward_plan.index_copy_(1, rows, table[0] + torch.log(table[1]))
    return merged_table(table, target_logit)[0]


def merged_table(table: torch.Tensor, target_logit: torch.Tensor, excl: torch.Tensor | None = None):
    """The forward's [F, T, n] table merged over the vocabulary tiles, row by row (kernels/partials_merge.py:
    a row's bits do not depend on which rows are merged with it): (VocabPartials, and with excl, 1 - p_y)."""
    from .kernels.partials_merge import merge_partials

    merged, gap = merge_partials(table, excl)
    return VocabPartials(merged[0], merged[1], target_logit, *merged[2:]), gap


def backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform: LogitTransform, *, need_dx: bool,
             need_dw: bool, need_db: bool, grad_tolerance: float, backward_plan: torch.Tensor,
             workspace_bytes: int | None):
    """dX [N, H] in the hidden states' dtype (zero at unscored rows), dW [V, H] in the weight's, db fp32 [V]."""
    hidden_2d, weight = row_major(hidden_2d), row_major(weight)
    dx_rows, dw, db = scored_rows_backward(
        hidden_2d, weight, bias, rows, targets, lse, grad, transform, need_dx=need_dx, need_dw=need_dw,
        need_db=need_db, workspace_bytes=workspace_bytes, tolerance=grad_tolerance,
        tile_lse=backward_plan.index_select(1, rows) if backward_plan.numel() else None)
    if dx_rows is None:
        return None, dw, db
    return scatter_rows(dx_rows, rows, hidden_2d), dw, db


# Rows cast at once when the fp32 dX rows are scattered into dX: a bounded temporary, not a second [n, H].
SCATTER_ELEMENTS = 1 << 22


def scatter_rows(dx_rows: torch.Tensor, rows: torch.Tensor, hidden_2d: torch.Tensor) -> torch.Tensor:
    """dX [N, H] in the hidden states' dtype: dx_rows (fp32 [n, H]) at `rows`, zero elsewhere."""
    dx = torch.zeros(hidden_2d.shape, dtype=hidden_2d.dtype, device=hidden_2d.device)
    if dx_rows.dtype == dx.dtype:
        return dx.index_copy_(0, rows, dx_rows)
    step = max(1, SCATTER_ELEMENTS // max(1, dx.shape[1]))
    for r0 in range(0, rows.numel(), step):
        dx.index_copy_(0, rows[r0:r0 + step], dx_rows[r0:r0 + step].to(dx.dtype))
    return dx


def row_major(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume a unit stride along the hidden dimension; rows may be strided.
    return t if t.stride(-1) == 1 else t.contiguous()


def chunk_width(n_rows: int, weight: torch.Tensor, workspace_bytes: int) -> int:
    block_v = gemm_config(weight.dtype, device_capability(weight.device), weight.shape[1])["BLOCK_V"]
    return vocab_chunk_width(n_rows, weight.shape[0], weight.element_size(), block_v, workspace_bytes)


def scored_rows_backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform: LogitTransform, *,
                         need_dx: bool, need_dw: bool, need_db: bool, workspace_bytes: int | None = None,
                         tolerance: float = 0.0, tile_lse: torch.Tensor | None = None):
    """(dX of the scored rows fp32 [n, H], dW [V, H] in the weight's dtype, db fp32 [V]); None where not needed.

    tolerance > 0 (with the forward's tile_lse) takes the block-sparse path when it skips enough
    pairs to pay (fastdpo.sparse_plan, kernels/sparse_backward.py).
    """
    n_rows, (vocab_size, hidden_size) = rows.numel(), weight.shape
    dx = torch.zeros((n_rows, hidden_size), dtype=torch.float32, device=weight.device) if need_dx else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(vocab_size, dtype=torch.float32, device=weight.device) if need_db else None
    if workspace_bytes is None:
        workspace_bytes = default_workspace_bytes(weight.device, n_rows, vocab_size, hidden_size, weight.dtype)
    if tolerance > 0:
        cfg = gemm_config(weight.dtype, device_capability(weight.device), hidden_size)
        kept = kept_pairs(tile_lse, lse, targets, cfg["BLOCK_M"], cfg["BLOCK_V"], tolerance)
        if kept.float().mean() <= SPARSE_BREAK_EVEN:
            _sparse_backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform, kept, cfg, workspace_bytes,
                             dx, dw, db)
            return dx, dw, db
    _dense_backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform, workspace_bytes, dx, dw, db)
    return dx, dw, db


# Above this kept fraction the dense chunks win. Measured on an H200 at Llama-3-8B, 16k tokens
# (benchmarks/results/nvidia-h200/gpu_check.md): the three sparse kernels took 16.7 ms at f = 0.1 against
# ~98 ms for the dense backward, so they break even near f = 0.58 if they scale linearly in f; the cost
# model puts it at 0.38-0.5 on an H100. 0.5 until both are measured.
SPARSE_BREAK_EVEN = 0.5


def _sparse_backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform, kept, cfg, workspace_bytes,
                     dx, dw, db):
    from .kernels.sparse_backward import sparse_dw, sparse_dx, sparse_logits_grad

    tile_elements = cfg["BLOCK_M"] * cfg["BLOCK_V"]
    max_pairs = max(1, workspace_bytes // (tile_elements * weight.element_size()))
    chunks = [pair_lists(kept, first, last) for first, last in tile_chunks(kept, max_pairs)]
    workspace = torch.empty((max(pairs.count for pairs in chunks), tile_elements), dtype=weight.dtype,
                            device=weight.device)
    for index, pairs in enumerate(chunks):
        d_tiles = workspace[: pairs.count]
        if pairs.count:
            sparse_logits_grad(hidden_2d, weight, bias, rows, targets, lse, grad, pairs.pair_block, pairs.pair_tile,
                               d_tiles, transform=transform)
        if dx is not None:
            sparse_dx(d_tiles, weight, pairs.block_start, pairs.pair_tile, dx, accumulate=index > 0)
        if dw is not None or db is not None:
            sparse_dw(d_tiles, hidden_2d, rows, pairs.tile_start, pairs.csc_block, pairs.csc_slot, pairs.first_tile,
                      dw, db, weight.shape[0])


def _dense_backward(hidden_2d, weight, bias, rows, targets, lse, grad, transform, workspace_bytes, dx, dw, db):
    from .kernels.logprob_backward import logits_grad

    n_rows, vocab_size = rows.numel(), weight.shape[0]
    # X's scored rows, [n, H], gathered once: the dW GEMM's operand and the persistent recompute's.
    persistent = persistent_config(hidden_2d.dtype, device_capability(hidden_2d.device), hidden_2d.shape[1])
    x_scored = hidden_2d.index_select(0, rows) if dw is not None or persistent is not None else None
    width = chunk_width(n_rows, weight, workspace_bytes)
    workspace = torch.empty((n_rows, width), dtype=weight.dtype, device=weight.device)
    for c0 in range(0, vocab_size, width):
        c1 = min(c0 + width, vocab_size)
        d_logits = workspace[:, : c1 - c0]
        logits_grad(hidden_2d, weight, bias, rows, targets, lse, grad, d_logits, c0, transform=transform,
                    x_scored=x_scored)
        if dx is not None:
            accumulate_product(dx, d_logits, weight[c0:c1])
        if dw is not None:
            torch.mm(d_logits.T, x_scored, out=dw[c0:c1])
        if db is not None:
            torch.sum(d_logits, dim=0, dtype=torch.float32, out=db[c0:c1])


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation, for 16-bit or fp32 a and b, without a temporary of acc's size.

    One helper for every fp32 accumulator: dX of the two-pass chunks and of the fused blocks, dW of the fused
    blocks (fastdpo.triton_fused)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and addmm_accumulates_16bit_into_fp32():
        # cuBLAS adds the 16-bit product into the fp32 accumulator in its epilogue (beta = 1, fp32 output):
        # the product is never rounded to 16 bits, and no [acc]-sized temporary exists.
        torch.addmm(acc, a, b, beta=1, out_dtype=acc.dtype, out=acc)
    elif acc.is_cuda:
        # A torch with mm's out_dtype but no such addmm: an fp32 product, then one add.
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        # CPU tensors (Triton's interpreter): torch has no 16-bit -> fp32 mm here; the 16-bit product is
        # accumulated in fp32 inside the GEMM and rounded once per chunk.
        acc.add_(torch.mm(a, b))


@functools.cache
def addmm_accumulates_16bit_into_fp32() -> bool:
    """Whether this torch has a CUDA kernel for addmm(..., out_dtype=, out=) (aten::addmm.dtype_out)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::addmm.dtype_out", "CUDA")
    except RuntimeError:  # no such operator in this torch
        return False
