"""The PyTorch path (CPU, or any device without Triton): the fused kernels' algorithm in torch tiles.

Same two-pass design as the Triton kernels: the forward folds tiles of (tokens x vocab) logits into
online-softmax partials (fastdpo.softmax_stats) and keeps only lse per token; the backward
recomputes each tile and turns it into dX / dW / db contributions. At most one logits tile (plus
its softmax) exists at a time, TILE_ELEMENTS values each.

The loops run vocabulary-outer: a slice of W (and of dW) stays in cache while every token block
passes over it, so dW is written once per slice rather than once per token block.
"""

from __future__ import annotations

import torch

from .softmax_stats import VocabPartials, merge

# 2^21 fp32 values = 8 MiB per tile. Measured on 2 cores (2048 tokens, H=256, V=65536, fwd+bwd):
# 1 MiB tiles 13.6 s, 4 MiB 10.1 s, 8 MiB 6.9 s, 16 MiB 6.8 s: below ~8 MiB the GEMMs get too thin
# to run at full speed, above it the gain is small while the tile still costs memory.
TILE_ELEMENTS = 1 << 21
# Vocabulary slices are whole multiples of this (GEMM kernels prefer aligned widths).
VOCAB_ALIGN = 128


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_shape(n_rows: int, vocab_size: int) -> tuple[int, int]:
    vocab_chunk = max(VOCAB_ALIGN, TILE_ELEMENTS // max(n_rows, 1) // VOCAB_ALIGN * VOCAB_ALIGN)
    vocab_chunk = min(vocab_size, vocab_chunk)
    token_chunk = max(1, min(n_rows, TILE_ELEMENTS // vocab_chunk))
    return token_chunk, vocab_chunk


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


def _logits(x, w, b, transform: Transform) -> torch.Tensor:
    raw = x @ w.T if b is None else torch.addmm(b, x, w.T)
    return transform(raw)


def _tile_partials(z: torch.Tensor, targets: torch.Tensor, col_start: int, with_stats: bool) -> VocabPartials:
    tile_max = z.max(dim=1).values
    p = torch.exp(z - tile_max[:, None])
    local = targets - col_start
    in_tile = (local >= 0) & (local < z.shape[1])
    gathered = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    target_logit = torch.where(in_tile, gathered, torch.zeros_like(gathered))
    parts = VocabPartials(tile_max, p.sum(1), target_logit)
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


def forward_partials(x, weight, bias, targets, transform: Transform, with_stats: bool) -> VocabPartials:
    """Merged softmax partials of compact rows x [n, H] (accumulation dtype) over the vocabulary."""
    if transform.is_linear and bias is None and not with_stats:
        partials = _shifted_forward(x, weight, targets, transform.linear_factor)
        if bool(torch.isfinite(partials.sum_exp).all()):
            return partials
        # A logit more than ~88 nats above its row's target logit overflowed exp (or the input holds
        # NaN/inf): the general path below rescales by the running maximum and propagates NaN.
    return _online_forward(x, weight, bias, targets, transform, with_stats)


def _shifted_forward(x, weight, targets, factor: float) -> VocabPartials:
    """lse without a max pass: every tile is exponentiated relative to the row's target logit.

    Any value a row actually attains is a safe shift for its logsumexp: logits far below it underflow
    to 0 and add nothing that float32 could hold next to exp(0) = 1. The shift is fused into the GEMM
    (addmm's broadcast input), so a tile costs one GEMM, one in-place exp and one row sum.
    """
    n_rows, vocab_size = x.shape[0], weight.shape[0]
    token_chunk, vocab_chunk = tile_shape(n_rows, vocab_size)
    target_logit = factor * (x * weight[targets].to(x.dtype)).sum(1)
    neg_shift = -target_logit[:, None]
    sum_exp = torch.zeros_like(target_logit)
    for v0 in range(0, vocab_size, vocab_chunk):
        w_t = weight[v0:v0 + vocab_chunk].to(x.dtype).T
        for r0 in range(0, n_rows, token_chunk):
            r1 = r0 + token_chunk
            tile = torch.addmm(neg_shift[r0:r1], x[r0:r1], w_t, alpha=factor).exp_()
            sum_exp[r0:r1] += tile.sum(1)
    return VocabPartials(max=target_logit, sum_exp=sum_exp, target_logit=target_logit)


def _online_forward(x, weight, bias, targets, transform: Transform, with_stats: bool) -> VocabPartials:
    n_rows, vocab_size = x.shape[0], weight.shape[0]
    token_chunk, vocab_chunk = tile_shape(n_rows, vocab_size)
    acc = x.dtype
    running = None
    for v0 in range(0, vocab_size, vocab_chunk):
        w = weight[v0:v0 + vocab_chunk].to(acc)
        b = None if bias is None else bias[v0:v0 + vocab_chunk].to(acc)
        blocks = [
            _tile_partials(_logits(x[r0:r0 + token_chunk], w, b, transform), targets[r0:r0 + token_chunk], v0,
                           with_stats)
            for r0 in range(0, n_rows, token_chunk)
        ]
        chunk = VocabPartials(*(None if f[0] is None else torch.cat(f) for f in zip(*blocks)))
        running = chunk if running is None else merge(_stack(running, chunk))
    return running


def backward(x, weight, bias, targets, lse, grad, transform: Transform, *, need_dx, need_dw, need_db):
    """(dX compact [n, H], dW [V, H], db [V]) in the accumulation dtype; None where not needed."""
    if transform.is_linear and bias is None:
        return _factored_backward(x, weight, targets, lse, grad, transform.linear_factor, need_dx, need_dw, need_db)
    return _tiled_backward(x, weight, bias, targets, lse, grad, transform, need_dx, need_dw, need_db)


def _factored_backward(x, weight, targets, lse, grad, factor, need_dx, need_dw, need_db):
    """The backward of a linear head with the per-token scalar g_i pulled out of every tile.

    dz = g (onehot - P) with P = exp(c X W^T - lse), so
        dX = c g (W[y] - P W),      dW = -P^T (c g X) + scatter_y(c g X),      db likewise,
    and the g-scaling touches [n, H] matrices instead of [n, V] tiles: each tile costs one GEMM with
    the lse shift fused in, one in-place exp, and the GEMMs of the products.
    """
    n_rows, vocab_size = x.shape[0], weight.shape[0]
    token_chunk, vocab_chunk = tile_shape(n_rows, vocab_size)
    scaled_grad = factor * grad
    expected_w = torch.zeros_like(x) if need_dx else None  # sum_v P[i, v] W[v]
    neg_x = -scaled_grad[:, None] * x if need_dw else None
    dw = torch.zeros(weight.shape, dtype=x.dtype, device=x.device) if need_dw else None
    db = torch.zeros(vocab_size, dtype=x.dtype, device=x.device) if need_db else None
    neg_lse = -lse[:, None]
    for v0 in range(0, vocab_size, vocab_chunk):
        v1 = v0 + vocab_chunk
        w = weight[v0:v1].to(x.dtype)
        for r0 in range(0, n_rows, token_chunk):
            r1 = r0 + token_chunk
            probs = torch.addmm(neg_lse[r0:r1], x[r0:r1], w.T, alpha=factor).exp_()
            if need_dx:
                expected_w[r0:r1].addmm_(probs, w)
            if need_dw:
                dw[v0:v1].addmm_(probs.T, neg_x[r0:r1])
            if need_db:
                db[v0:v1].addmv_(probs.T, -scaled_grad[r0:r1])
    dx = scaled_grad[:, None] * (weight[targets].to(x.dtype) - expected_w) if need_dx else None
    if need_dw:
        dw.index_add_(0, targets, scaled_grad[:, None] * x)
    if need_db:
        db.index_add_(0, targets, scaled_grad)
    return dx, dw, db


def _tiled_backward(x, weight, bias, targets, lse, grad, transform: Transform, need_dx, need_dw, need_db):
    n_rows, vocab_size = x.shape[0], weight.shape[0]
    token_chunk, vocab_chunk = tile_shape(n_rows, vocab_size)
    acc = x.dtype
    dx = torch.zeros_like(x) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_dw else None
    db = torch.zeros(vocab_size, dtype=acc, device=x.device) if need_db else None
    for v0 in range(0, vocab_size, vocab_chunk):
        w = weight[v0:v0 + vocab_chunk].to(acc)
        b = None if bias is None else bias[v0:v0 + vocab_chunk].to(acc)
        for r0 in range(0, n_rows, token_chunk):
            r1 = r0 + token_chunk
            z = _logits(x[r0:r1], w, b, transform)
            d_z = _logits_gradient(z, targets[r0:r1] - v0, lse[r0:r1], grad[r0:r1])
            d_raw = transform.scale_gradient_(d_z, z)
            if dx is not None:
                dx[r0:r1].addmm_(d_raw, w)
            if dw is not None:
                dw[v0:v0 + vocab_chunk].addmm_(d_raw.T, x[r0:r1])
            if db is not None:
                db[v0:v0 + vocab_chunk] += d_raw.sum(0)
    return dx, dw, db


def _logits_gradient(z, local_targets, lse, grad):
    """g * (onehot - softmax), built in place of z's copy: one tile of memory."""
    d_z = torch.sub(z, lse[:, None]).exp_().mul_(-grad[:, None])
    in_tile = (local_targets >= 0) & (local_targets < z.shape[1])
    rows = in_tile.nonzero().squeeze(1)
    d_z[rows, local_targets[rows]] += grad[rows]
    return d_z
