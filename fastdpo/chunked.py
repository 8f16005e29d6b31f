"""The PyTorch path (CPU, or any device without Triton): the fused kernels' algorithm in torch tiles.

Same two-pass design as the Triton kernels: the forward folds (tokens x vocab) logits tiles into
per-token softmax statistics and keeps only lse per token; the backward recomputes each tile and
turns it into dX / dW / db contributions. At most one logits tile of TILE_ELEMENTS values exists at
a time, and the hidden states are read through row indices, never copied whole.

Loops run token-block-outer: a block of hidden rows (and its per-row buffers) is gathered once and
meets every vocabulary slice, so the extra memory is one tile plus a few [TOKEN_BLOCK, H] buffers.

Two variants of each pass:
- linear heads (no softcap, no bias, no statistics: the common case) use a fixed per-row shift and
  pull the per-token gradient scalar out of the tiles, so a tile costs its GEMMs and one exp;
- everything else (softcap, bias, statistics) uses the online-softmax partials of
  fastdpo.softmax_stats and the explicit d_logits tile.
"""

from __future__ import annotations

import torch

from .softmax_stats import VocabPartials, merge

# 2^15 values (128 KiB in fp32) per logits tile, 128 token rows per block. On 2 idle cores (1273
# scored tokens, H=256, V=65536, fwd+bwd) tiles of 2^15 to 2^21 values all ran in 1.2-1.5 s, while
# the memory held beyond the gradients grew with the tile (from ~2.5 MiB at 2^15 to ~49 MiB at 2^21,
# GEMM packing buffers included): on CPU small tiles cost nothing.
TILE_ELEMENTS = 1 << 15
TOKEN_BLOCK = 128
# Vocabulary slices are whole multiples of this (GEMM kernels prefer aligned widths).
VOCAB_ALIGN = 128


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def vocab_slices(vocab_size: int, token_block: int):
    width = max(VOCAB_ALIGN, TILE_ELEMENTS // token_block // VOCAB_ALIGN * VOCAB_ALIGN)
    return [(v0, min(v0 + width, vocab_size)) for v0 in range(0, vocab_size, width)]


def token_blocks(n_rows: int):
    return [(r0, min(r0 + TOKEN_BLOCK, n_rows)) for r0 in range(0, n_rows, TOKEN_BLOCK)]


class Transform:
    """z = transform(raw) and dz/draw, TRL's order: scale, softcap, temperature."""

    def __init__(self, logit_scale=1.0, softcap=None, temperature=1.0):
        self.logit_scale, self.softcap, self.inv_temperature = logit_scale, softcap, 1.0 / temperature

    @property
    def is_linear(self) -> bool:
        return self.softcap is None

    @property
    def linear_factor(self) -> float:
        return self.logit_scale * self.inv_temperature

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        z = raw.mul_(self.logit_scale) if self.logit_scale != 1.0 else raw
        if self.softcap is not None:
            z = z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z.mul_(self.inv_temperature) if self.inv_temperature != 1.0 else z

    def scale_gradient_(self, d_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d_z.mul_(self.logit_scale * self.inv_temperature)
        if self.softcap is not None:
            capped = z / (self.softcap * self.inv_temperature)
            d_z.mul_(1 - capped * capped)
        return d_z


class Rows:
    """The scored rows of the hidden states: gathered block by block in the accumulation dtype."""

    def __init__(self, hidden_2d: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
        self.hidden, self.rows, self.targets = hidden_2d, rows, targets
        self.dtype = accumulation_dtype(hidden_2d.dtype)

    def __len__(self) -> int:
        return self.rows.numel()

    def block(self, r0: int, r1: int) -> torch.Tensor:
        return self.hidden.index_select(0, self.rows[r0:r1]).to(self.dtype)


def _weight_slice(weight, bias, v0, v1, dtype):
    return weight[v0:v1].to(dtype), None if bias is None else bias[v0:v1].to(dtype)


# --- forward -------------------------------------------------------------------------------------


def forward_partials(x: Rows, weight, bias, transform: Transform, with_stats: bool) -> VocabPartials:
    """Merged softmax partials of the scored rows over the whole vocabulary."""
    if transform.is_linear and bias is None and not with_stats:
        partials = _shifted_forward(x, weight, transform.linear_factor)
        if bool(torch.isfinite(partials.sum_exp).all()):
            return partials
        # A logit more than ~88 nats above its row's target logit overflowed exp (or the input holds
        # NaN/inf): the online path rescales by the running maximum and propagates NaN.
    blocks = [_online_block(x, r0, r1, weight, bias, transform, with_stats) for r0, r1 in token_blocks(len(x))]
    return VocabPartials(*(None if field[0] is None else torch.cat(field) for field in zip(*blocks)))


def _shifted_forward(x: Rows, weight, factor: float) -> VocabPartials:
    """lse without a max pass: every tile is exponentiated relative to the row's target logit.

    Any value a row actually attains is a safe shift for its logsumexp: logits far below it underflow
    to 0 and add nothing that float32 could hold next to exp(0) = 1. The shift is fused into the GEMM
    (addmm's broadcast input), so a tile costs one GEMM, one in-place exp and one row sum.
    """
    target_logits, sums = [], []
    for r0, r1 in token_blocks(len(x)):
        xb = x.block(r0, r1)
        target_logit = factor * torch.linalg.vecdot(xb, weight.index_select(0, x.targets[r0:r1]).to(x.dtype))
        neg_shift, sum_exp = -target_logit[:, None], torch.zeros_like(target_logit)
        slices = vocab_slices(weight.shape[0], r1 - r0)
        tile = torch.empty(r1 - r0, slices[0][1] - slices[0][0], dtype=x.dtype, device=xb.device)
        for v0, v1 in slices:
            w = weight[v0:v1].to(x.dtype)
            probs = torch.addmm(neg_shift, xb, w.T, alpha=factor, out=tile[:, : v1 - v0]).exp_()
            sum_exp += probs.sum(1)
        target_logits.append(target_logit)
        sums.append(sum_exp)
    target_logit = torch.cat(target_logits)
    return VocabPartials(max=target_logit, sum_exp=torch.cat(sums), target_logit=target_logit)


def _online_block(x: Rows, r0, r1, weight, bias, transform: Transform, with_stats: bool) -> VocabPartials:
    xb, targets = x.block(r0, r1), x.targets[r0:r1]
    running = None
    for v0, v1 in vocab_slices(weight.shape[0], r1 - r0):
        w, b = _weight_slice(weight, bias, v0, v1, x.dtype)
        tile = _tile_partials(_logits(xb, w, b, transform), targets, v0, with_stats)
        running = tile if running is None else merge(_stack(running, tile))
    return running


def _logits(x, w, b, transform: Transform) -> torch.Tensor:
    raw = x @ w.T if b is None else torch.addmm(b, x, w.T)
    return transform(raw)


def _tile_partials(z: torch.Tensor, targets: torch.Tensor, col_start: int, with_stats: bool) -> VocabPartials:
    tile_max = z.max(dim=1).values
    p = torch.exp(z - tile_max[:, None])
    local = targets - col_start
    in_tile = (local >= 0) & (local < z.shape[1])
    gathered = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    parts = VocabPartials(tile_max, p.sum(1), torch.where(in_tile, gathered, torch.zeros_like(gathered)))
    if not with_stats:
        return parts
    cols = torch.arange(col_start, col_start + z.shape[1], device=z.device)
    before_target = z.masked_fill(cols[None, :] >= targets[:, None], float("-inf"))
    return parts._replace(
        z_sum_exp=(p * z).sum(1), sq_sum_exp=(p * p).sum(1), z_sum=z.sum(1),
        max_before_target=before_target.max(dim=1).values,
    )


def _stack(a: VocabPartials, b: VocabPartials) -> VocabPartials:
    return VocabPartials(*(None if x is None else torch.stack([x, y]) for x, y in zip(a, b)))


# --- backward ------------------------------------------------------------------------------------


def backward(x: Rows, weight, bias, lse, grad, transform: Transform, *, dx, dw, db, filter_eps: float = 0.0):
    """Accumulate into dx ([N, H], indexed by x.rows), dw ([V, H]) and db ([V]); each may be None.

    All three are in the accumulation dtype and zero-initialised by the caller. With filter_eps > 0,
    a tile whose softmax stays below it (and, on the tiled path, that holds no target) adds nothing.
    """
    linear = transform.is_linear and bias is None
    for r0, r1 in token_blocks(len(x)):
        xb, targets = x.block(r0, r1), x.targets[r0:r1]
        block = _factored_block if linear else _tiled_block
        dx_block = block(xb, targets, weight, bias, lse[r0:r1], grad[r0:r1], transform, dw, db,
                         need_dx=dx is not None, filter_eps=filter_eps)
        if dx is not None:
            dx.index_copy_(0, x.rows[r0:r1], dx_block)


def _factored_block(xb, targets, weight, _bias, lse, grad, transform: Transform, dw, _db, need_dx, filter_eps):
    """The backward of a linear head with the per-token scalar g_i pulled out of every tile.

    dz = g (onehot - P) with P = exp(c X W^T - lse), so
        dX = c g (W[y] - P W),      dW = -(c g P)^T X + scatter_y(c g X),
    and the onehot term never touches a tile: each tile costs one GEMM with the lse shift fused in,
    one in-place exp, one row scaling, and the GEMMs of the products. (No bias on this path.)
    """
    factor = transform.linear_factor
    scaled_grad = factor * grad
    expected_w = torch.zeros_like(xb) if need_dx else None  # sum_v P[i, v] W[v]
    neg_lse, neg_scaled_grad = -lse[:, None], -scaled_grad[:, None]
    slices = vocab_slices(weight.shape[0], xb.shape[0])
    tile = torch.empty(xb.shape[0], slices[0][1] - slices[0][0], dtype=xb.dtype, device=xb.device)  # reused
    for v0, v1 in slices:
        w = weight[v0:v1].to(xb.dtype)
        probs = torch.addmm(neg_lse, xb, w.T, alpha=factor, out=tile[:, : v1 - v0]).exp_()
        if filter_eps and bool(probs.max() < filter_eps):  # the onehot term is added exactly below
            continue
        if need_dx:
            expected_w.addmm_(probs, w)
        if dw is not None:
            # Scaling the tile's rows costs O(block x slice), against O(block x slice x H) for its
            # GEMMs, and saves a [block, H] copy of -c g X.
            dw[v0:v1].addmm_(probs.mul_(neg_scaled_grad).T, xb)
    if dw is not None:  # the onehot term: c g_i x_i into row y_i (xb is this block's own copy)
        dw.index_add_(0, targets, xb.mul_(scaled_grad[:, None]))
    if need_dx:  # c g (W[y] - E[W]), in place in the E buffer
        return expected_w.sub_(weight.index_select(0, targets).to(xb.dtype)).mul_(-scaled_grad[:, None])
    return None


def _tiled_block(xb, targets, weight, bias, lse, grad, transform: Transform, dw, db, need_dx, filter_eps):
    dx = torch.zeros_like(xb) if need_dx else None
    for v0, v1 in vocab_slices(weight.shape[0], xb.shape[0]):
        w, b = _weight_slice(weight, bias, v0, v1, xb.dtype)
        z = _logits(xb, w, b, transform)
        d_z = _logits_gradient(z, targets - v0, lse, grad, filter_eps)
        if d_z is None:
            continue
        d_raw = transform.scale_gradient_(d_z, z)
        if need_dx:
            dx.addmm_(d_raw, w)
        if dw is not None:
            dw[v0:v1].addmm_(d_raw.T, xb)
        if db is not None:
            db[v0:v1] += d_raw.sum(0)
    return dx


def _logits_gradient(z, local_targets, lse, grad, filter_eps=0.0):
    """g * (onehot - softmax), built in one new tile; None when the gradient filter drops the tile."""
    probs = torch.sub(z, lse[:, None]).exp_()
    in_tile = (local_targets >= 0) & (local_targets < z.shape[1])
    if filter_eps and not bool(in_tile.any()) and bool(probs.max() < filter_eps):
        return None
    d_z = probs.mul_(-grad[:, None])
    rows = in_tile.nonzero().squeeze(1)
    d_z[rows, local_targets[rows]] += grad[rows]
    return d_z
