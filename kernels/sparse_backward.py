"""Block-sparse backward: d_logits, dX and dW over a work list of kept (token block, vocabulary tile) pairs.

fastdpo.sparse_plan decides, from the forward's per-tile logsumexps and before anything is
recomputed, which (token block M, vocabulary tile j) pairs the backward may skip: a pair is dropped
only while every row of M keeps its total dropped probability mass within the tolerance δ, and the
tiles holding a target are always kept (so the onehot term is exact). The kept pairs form a block-
sparse matrix, listed twice: row-major (CSR, by token block) and column-major (CSC, by tile).

    D[k]           = g (onehot - softmax) transform'   on the k-th kept pair (M_k, j_k)   [BLOCK_M, BLOCK_V]
    dX[M]         += sum_{k in row M}    D[k] @ W[j_k]                                    (CSR order)
    dW[j]          = sum_{k in column j} D[k]^T @ X[M_k]      (zero for a tile nobody kept; CSC order)
    db[j]          = sum_{k in column j} colsum(D[k])

Each dX and dW tile is owned by one program that loops over its pairs in a fixed order and writes
once: no atomics, bitwise reproducible. With a fraction f of the pairs kept, the backward costs
f x 6 n V H FLOPs instead of 6 n V H, and the dropped part of row i's d_logits has L1 norm at most
|g_i| δ (its dX error at most |g_i| δ max_v ||W_v||).

Tiles: the forward's BLOCK_M x BLOCK_V (config.gemm_config), so D[k] is the forward's logits tile;
the GEMMs take BLOCK_H = BLOCK_V columns of H at a time and walk the tile's BLOCK_V columns (dX) or
BLOCK_M rows (dW) BLOCK_K at a time, the forward's K step.
"""

import triton
import triton.language as tl

from .config import device_capability, gemm_config, input_precision
from .logits_tile import grouped_tile, tile_arguments
from .logprob_backward import d_logits_tile


@triton.jit
def sparse_logits_grad_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr, pair_block_ptr, pair_tile_ptr, out_ptr,
    n_rows, vocab_size, hidden_size, stride_x, stride_w,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per kept pair k: D[k] into out[k] ([BLOCK_M, BLOCK_V], zero outside the matrix)."""
    k = tl.program_id(0)
    cols = tl.load(pair_tile_ptr + k) * BLOCK_V + tl.arange(0, BLOCK_V)
    d_raw, _valid = d_logits_tile(
        x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr, tl.load(pair_block_ptr + k), cols,
        cols < vocab_size, n_rows, hidden_size, stride_x, stride_w, logit_scale, softcap, inv_temperature,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION,
    )
    tile = out_ptr + k.to(tl.int64) * (BLOCK_M * BLOCK_V)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    tl.store(tile + offs, d_raw.to(out_ptr.dtype.element_ty))  # the whole tile: zeros where not valid


@triton.jit
def sparse_dx_kernel(
    d_ptr, w_ptr, block_start_ptr, pair_tile_ptr, dx_ptr,
    n_rows, vocab_size, hidden_size, stride_w, stride_dx,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dX[M, h-slice] (+)= sum over the kept pairs of token block M of D[k] @ W[j_k, h-slice], fp32.

    The product's K is the tile's BLOCK_V columns, taken BLOCK_K at a time (the forward's K step).
    Grouped order: GROUP token blocks sweep the H slices together, so their D tiles are read from HBM
    once and W's rows once per group (not once per H slice, nor once per block)."""
    pid_m, pid_h = grouped_tile(tl.program_id(0), n_rows, hidden_size, BLOCK_M, BLOCK_H, GROUP)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden_size
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    for k in range(tl.load(block_start_ptr + pid_m), tl.load(block_start_ptr + pid_m + 1)):
        tile = d_ptr + tl.cast(k, tl.int64) * (BLOCK_M * BLOCK_V)
        first_col = tl.load(pair_tile_ptr + k) * BLOCK_V
        for kk in tl.static_range(0, BLOCK_V, BLOCK_K):
            offs_v = kk + tl.arange(0, BLOCK_K)
            d = tl.load(tile + tl.arange(0, BLOCK_M)[:, None] * BLOCK_V + offs_v[None, :])
            cols = first_col + offs_v
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + offs_h[None, :],
                        mask=(cols < vocab_size)[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(d, w, acc, input_precision=INPUT_PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dx + offs_h[None, :]
    mask = (offs_m < n_rows)[:, None] & h_mask[None, :]
    if ACCUMULATE:  # an earlier vocabulary chunk wrote its part: one writer per element per launch
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


@triton.jit
def sparse_dw_kernel(
    d_ptr, x_ptr, rows_ptr, tile_start_ptr, pair_block_ptr, pair_slot_ptr, dw_ptr, db_ptr,
    first_tile, n_tiles, h_extent, n_rows, vocab_size, hidden_size, stride_x, stride_dw,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dW[j, h-slice] = sum over the kept pairs of tile j of D[k]^T @ X[M_k, h-slice], written once in the
    weight's dtype (zeros for a tile nobody kept); db[j] likewise, by the programs of the first h-slice.

    The product's K is the block's BLOCK_M rows, taken BLOCK_K at a time. Grouped order: GROUP
    vocabulary tiles sweep the H slices together (their D tiles are read once, X once per group)."""
    local, pid_h = grouped_tile(tl.program_id(0), n_tiles * BLOCK_V, h_extent, BLOCK_V, BLOCK_H, GROUP)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden_size
    acc = tl.zeros((BLOCK_V, BLOCK_H), tl.float32)
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    for c in range(tl.load(tile_start_ptr + local), tl.load(tile_start_ptr + local + 1)):
        tile = d_ptr + tl.load(pair_slot_ptr + c).to(tl.int64) * (BLOCK_M * BLOCK_V)
        first_row = tl.load(pair_block_ptr + c) * BLOCK_M
        for kk in tl.static_range(0, BLOCK_M, BLOCK_K):
            offs_r = kk + tl.arange(0, BLOCK_K)
            d = tl.load(tile + offs_r[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :])
            if COMPUTE_DW:
                offs_m = first_row + offs_r
                row_mask = offs_m < n_rows
                rows = tl.load(rows_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
                x = tl.load(x_ptr + rows[:, None] * stride_x + offs_h[None, :],
                            mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans(d), x, acc, input_precision=INPUT_PRECISION)
            if COMPUTE_DB:
                bias_acc += tl.sum(d.to(tl.float32), axis=0)
    cols = (first_tile + local) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab_size
    if COMPUTE_DW:
        out = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + offs_h[None, :]
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & h_mask[None, :])
    if COMPUTE_DB:
        if pid_h == 0:
            tl.store(db_ptr + cols, bias_acc, mask=col_mask)


def sparse_gemm_options(dtype, capability, hidden_size) -> tuple[dict, dict]:
    """The forward's tile, and the block-sparse GEMMs' tiles and launch options."""
    cfg = gemm_config(dtype, capability, hidden_size)
    # The GEMMs' output tiles: BLOCK_M (or BLOCK_V) x BLOCK_V columns of H, the shape of the logits tile.
    # 8 warps: fp32's 4 leave the dW kernel spilling on sm_90 (tests/test_compile.py); 16-bit tiles have 8.
    # GROUP: dX groups the forward's GROUP_M token blocks; dW groups 4x as many vocabulary tiles, each of
    # which holds only the few blocks that kept it (at f = 0.1 and 16k tokens, 32 tiles' D is ~13 MB).
    return cfg, dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                     num_warps=max(8, cfg["num_warps"]), num_stages=cfg["num_stages"], GROUP=cfg["GROUP_M"])


DW_GROUP_FACTOR = 4


def _options_for(t):
    return sparse_gemm_options(t.dtype, device_capability(t.device), t.shape[1])


def sparse_logits_grad(hidden, weight, bias, rows, targets, lse, grad, pair_block, pair_tile, out, *, transform=None):
    """D for each listed pair into out ([pairs, BLOCK_M * BLOCK_V] in the input dtype); transform: see
    logits_tile.tile_arguments."""
    cfg, _ = _options_for(hidden)
    sparse_logits_grad_kernel[(pair_block.numel(),)](
        **tile_arguments(hidden, weight, bias, rows, targets, transform), lse_ptr=lse, grad_ptr=grad,
        pair_block_ptr=pair_block, pair_tile_ptr=pair_tile, out_ptr=out,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def sparse_dx(d_tiles, weight, block_start, pair_tile, dx, *, accumulate: bool):
    """dx (fp32 [n, H]) (+)= the block-sparse product of the listed tiles with W (CSR: block_start, pair_tile)."""
    _, tiles = _options_for(weight)
    (vocab_size, hidden_size) = weight.shape
    grid = ((block_start.numel() - 1) * triton.cdiv(hidden_size, tiles["BLOCK_H"]),)
    sparse_dx_kernel[grid](
        d_tiles, weight, block_start, pair_tile, dx, dx.shape[0], vocab_size, hidden_size, weight.stride(0),
        dx.stride(0), ACCUMULATE=accumulate, INPUT_PRECISION=input_precision(weight.dtype), **tiles,
    )


def sparse_dw(d_tiles, hidden, rows, tile_start, pair_block, pair_slot, first_tile, dw, db, vocab_size):
    """dW and db of the vocabulary tiles [first_tile, first_tile + len(tile_start) - 1) (CSC lists)."""
    _, tiles = _options_for(hidden)
    hidden_size = hidden.shape[1]
    h_extent = hidden_size if dw is not None else 1  # db alone: one program per tile
    n_tiles = tile_start.numel() - 1
    grid = (n_tiles * triton.cdiv(h_extent, tiles["BLOCK_H"]),)
    placeholder = d_tiles
    sparse_dw_kernel[grid](
        d_tiles, hidden, rows, tile_start, pair_block, pair_slot,
        placeholder if dw is None else dw, placeholder if db is None else db,
        first_tile, n_tiles, h_extent, rows.numel(), vocab_size, hidden_size, hidden.stride(0),
        hidden_size if dw is None else dw.stride(0), COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None,
        INPUT_PRECISION=input_precision(hidden.dtype), **dict(tiles, GROUP=tiles["GROUP"] * DW_GROUP_FACTOR),
    )
