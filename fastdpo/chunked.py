"""The PyTorch path (CPU, or any device without Triton): the fused kernels' algorithm in torch tiles.

Same two-pass design as the Triton kernels: the forward folds (tokens x vocab) logits tiles into
per-token softmax statistics and keeps only lse per token; the backward recomputes each tile and
turns it into dX / dW / db contributions. At most one logits tile of TILE_ELEMENTS values exists at
a time, and the hidden states are read through row indices, never copied whole.

Loops run token-block-outer: a block of hidden rows is gathered once and meets every vocabulary
slice. The extra memory is one tile and two [TOKEN_BLOCK, H] buffers, allocated once per step.

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
# GEMM packing buffers included, before BlockBuffers): on CPU small tiles cost nothing. Smaller
# tiles or 64-row blocks cost 20-50% more time there, through more Python-level iterations.
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
    """The scored rows of the hidden states, gathered block by block in the accumulation dtype."""

    def __init__(self, hidden_2d: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
        self.hidden, self.rows, self.targets = hidden_2d, rows, targets
        self.dtype = accumulation_dtype(hidden_2d.dtype)

    def __len__(self) -> int:
        return self.rows.numel()

    def block(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.hidden, self.rows[r0:r1], out)


def gather_rows(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """source[index] written into the first len(index) rows of `out` (converted to out's dtype)."""
    out = out[: index.numel()]
    if source.dtype == out.dtype:
        return torch.index_select(source, 0, index, out=out)
    return out.copy_(source.index_select(0, index))


class BlockBuffers:
    """The [block, H] and [block, slice] buffers that every token block reuses.

    One allocation per step (the autograd function hands the forward's to the backward), not a few
    per block. Measured on the quick benchmark: with per-block buffers a step's peak RSS ranged over
    67.3-68.3 MiB between processes at V=65536 (66.0 MiB of gradients); with one buffer per pass,
    34.6-35.1 MiB at V=32768 (34.0 of gradients), and with one per step 34.5-34.9. The vocabulary
    slices are fixed so that the last, shorter block fits the same tile.
    """

    def __init__(self, x: Rows, vocab_size: int):
        block_rows = max(1, min(TOKEN_BLOCK, len(x)))
        self.slices = vocab_slices(vocab_size, block_rows)
        rows_size = block_rows * x.hidden.shape[1]
        tile_size = block_rows * (self.slices[0][1] - self.slices[0][0])
        storage = torch.empty(2 * rows_size + tile_size, dtype=x.dtype, device=x.hidden.device)
        self.rows = storage[:rows_size].view(block_rows, -1)  # the block's hidden rows
        self.spare = storage[rows_size: 2 * rows_size].view(block_rows, -1)  # W[targets], or the block's dX
        self._tile = storage[2 * rows_size:]

    def tile_for(self, n_rows: int, v0: int, v1: int) -> torch.Tensor:
        """A contiguous [n_rows, v1 - v0] logits tile."""
        return self._tile[: n_rows * (v1 - v0)].view(n_rows, v1 - v0)


def _weight_slice(weight, bias, v0, v1, dtype):
    return weight[v0:v1].to(dtype), None if bias is None else bias[v0:v1].to(dtype)


# --- forward -------------------------------------------------------------------------------------


def forward_partials(x: Rows, weight, bias, transform: Transform, with_stats: bool,
                     buffers: BlockBuffers | None = None) -> VocabPartials:
    """Merged softmax partials of the scored rows over the whole vocabulary."""
    buffers = buffers or BlockBuffers(x, weight.shape[0])
    if transform.is_linear and bias is None and not with_stats:
        partials = _shifted_forward(x, weight, transform.linear_factor, buffers)
        if bool(torch.isfinite(partials.sum_exp).all()):
            return partials
        # A logit more than ~88 nats above its row's target logit overflowed exp (or the input holds
        # NaN/inf): the online path rescales by the running maximum and propagates NaN.
    blocks = [_online_block(x, r0, r1, weight, bias, transform, with_stats, buffers)
              for r0, r1 in token_blocks(len(x))]
    return VocabPartials(*(None if field[0] is None else torch.cat(field) for field in zip(*blocks)))


def _shifted_forward(x: Rows, weight, factor: float, buffers: BlockBuffers) -> VocabPartials:
    """lse without a max pass: every tile is exponentiated relative to the row's target logit.

    Any value a row actually attains is a safe shift for its logsumexp: logits far below it underflow
    to 0 and add nothing that float32 could hold next to exp(0) = 1. The shift is fused into the GEMM
    (addmm's broadcast input), so a tile costs one GEMM, one in-place exp and one row sum.
    """
    target_logits, sums = [], []
    for r0, r1 in token_blocks(len(x)):
        xb = x.block(r0, r1, buffers.rows)
        # x_i . W[y_i], multiplied in place in the spare buffer (vecdot would allocate the product)
        target_logit = gather_rows(weight, x.targets[r0:r1], buffers.spare).mul_(xb).sum(1).mul_(factor)
        neg_shift, sum_exp = -target_logit[:, None], torch.zeros_like(target_logit)
        for v0, v1 in buffers.slices:
            w = weight[v0:v1].to(x.dtype)
            probs = torch.addmm(neg_shift, xb, w.T, alpha=factor, out=buffers.tile_for(r1 - r0, v0, v1)).exp_()
            sum_exp += probs.sum(1)
        target_logits.append(target_logit)
        sums.append(sum_exp)
    target_logit = torch.cat(target_logits)
    return VocabPartials(max=target_logit, sum_exp=torch.cat(sums), target_logit=target_logit)


def _online_block(x: Rows, r0, r1, weight, bias, transform: Transform, with_stats: bool,
                  buffers: BlockBuffers) -> VocabPartials:
    xb, targets = x.block(r0, r1, buffers.rows), x.targets[r0:r1]
    running = None
    for v0, v1 in buffers.slices:
        w, b = _weight_slice(weight, bias, v0, v1, x.dtype)
        z = _logits(xb, w, b, transform, out=buffers.tile_for(r1 - r0, v0, v1))
        tile = _tile_partials(z, targets, v0, with_stats)
        running = tile if running is None else merge(_stack(running, tile))
    return running


def _logits(x, w, b, transform: Transform, out: torch.Tensor) -> torch.Tensor:
    raw = torch.mm(x, w.T, out=out) if b is None else torch.addmm(b, x, w.T, out=out)
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


def backward(x: Rows, weight, bias, lse, grad, transform: Transform, *, dx, dw, db, filter_eps: float = 0.0,
             buffers: BlockBuffers | None = None):
    """Accumulate into dx ([N, H], indexed by x.rows), dw ([V, H]) and db ([V]); each may be None.

    All three are in the accumulation dtype and zero-initialised by the caller. With filter_eps > 0,
    a tile whose softmax stays below it (and, on the tiled path, that holds no target) adds nothing.
    `buffers` may be the forward's: one allocation then serves the whole step.
    """
    block = _factored_block if transform.is_linear and bias is None else _tiled_block
    buffers = buffers or BlockBuffers(x, weight.shape[0])
    for r0, r1 in token_blocks(len(x)):
        xb, targets = x.block(r0, r1, buffers.rows), x.targets[r0:r1]
        dx_block = buffers.spare[: r1 - r0].zero_() if dx is not None else None
        block(xb, targets, weight, bias, lse[r0:r1], grad[r0:r1], transform, buffers, dx_block=dx_block, dw=dw,
              db=db, filter_eps=filter_eps)
        if dx is not None:
            dx.index_copy_(0, x.rows[r0:r1], dx_block)


def _factored_block(xb, targets, weight, _bias, lse, grad, transform: Transform, buffers: BlockBuffers, *,
                    dx_block, dw, db, filter_eps):
    """The backward of a linear head with the per-token scalar g_i pulled out of every tile.

    dz = g (onehot - P) with P = exp(c X W^T - lse), so
        dX = c g (W[y] - P W),      dW = -(c g P)^T X + scatter_y(c g X),
    and the onehot term never touches a tile: each tile costs one GEMM with the lse shift fused in,
    one in-place exp, one row scaling, and the GEMMs of the products. (No bias on this path.)
    dx_block first accumulates E[W] = sum_v P[i, v] W[v].
    """
    factor = transform.linear_factor
    scaled_grad = factor * grad
    neg_lse, neg_scaled_grad = -lse[:, None], -scaled_grad[:, None]
    for v0, v1 in buffers.slices:
        w = weight[v0:v1].to(xb.dtype)
        tile = buffers.tile_for(xb.shape[0], v0, v1)
        probs = torch.addmm(neg_lse, xb, w.T, alpha=factor, out=tile).exp_()
        if filter_eps and bool(probs.max() < filter_eps):  # the onehot term is added exactly below
            continue
        if dx_block is not None:
            dx_block.addmm_(probs, w)
        if dw is not None:
            # Scaling the tile's rows costs O(block x slice), against O(block x slice x H) for its
            # GEMMs, and saves a [block, H] copy of -c g X.
            dw[v0:v1].addmm_(probs.mul_(neg_scaled_grad).T, xb)
    if dw is not None:  # the onehot term: c g_i x_i into row y_i (xb is the block's own buffer)
        dw.index_add_(0, targets, xb.mul_(scaled_grad[:, None]))
    if dx_block is not None:  # c g (W[y] - E[W]), with W[y] gathered into the free rows buffer
        dx_block.sub_(gather_rows(weight, targets, buffers.rows)).mul_(neg_scaled_grad)


def _tiled_block(xb, targets, weight, bias, lse, grad, transform: Transform, buffers: BlockBuffers, *,
                 dx_block, dw, db, filter_eps):
    for v0, v1 in buffers.slices:
        w, b = _weight_slice(weight, bias, v0, v1, xb.dtype)
        z = _logits(xb, w, b, transform, out=buffers.tile_for(xb.shape[0], v0, v1))
        d_z = _logits_gradient(z, targets - v0, lse, grad, filter_eps)
        if d_z is None:
            continue
        d_raw = transform.scale_gradient_(d_z, z)
        if dx_block is not None:
            dx_block.addmm_(d_raw, w)
        if dw is not None:
            dw[v0:v1].addmm_(d_raw.T, xb)
        if db is not None:
            db[v0:v1] += d_raw.sum(0)


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
