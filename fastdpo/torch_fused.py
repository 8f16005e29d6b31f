"""The fused routes' compute on the PyTorch path (CPU): the forward's tiles kept, or consumed, in place.

The forward is the two-pass path's own (chunked.forward_block / forward_partials over the same token
blocks, slices and worker parts), so the log-probs are the same bits; only where each finished tile
goes differs (chunked.Part.done, BlockBuffers.start_block). With n scored tokens, P = n·H·V:

Trainable head (StoredLogits), 3 passes (6P FLOPs; the two-pass path spends 8P):
    pass 1  each token block's tiles land in a workspace slot of block_rows x V values:
                shifted (linear head, no bias):  e = exp(z - t)   (t: the row's target logit)
                online (softcap or bias):        z
    once the loss has given g for all of a block's rows (fastdpo.fused_pass), its tiles become d_logits:
                shifted:  D = c g (onehot - e / S)           (S = sum_v e_v, c = logit_scale / temperature)
                online:   D = g (onehot - exp(z - lse)) * transform'(z)
            with the target entry set to g (1 - p_y) t'_y, 1 - p_y = sum_{v != y} p_v summed beside the
            forward's tiles (_TargetFreePart): onehot - p_y would cancel when p_y -> 1
    pass 2  dX rows = D W          (each worker part's share, summed in a fixed order)
    pass 3  dW += D^T X, db += sum_rows D   (parts own disjoint vocabulary rows: no races).
On the shifted path passes 2 and 3 take every row released together at once (_FlushGroup): a part forms a
slice's D for all of them in one [rows, slice] buffer, then the slice's two GEMMs, so the slice of W and dW is
read once per flush and dW's GEMM sums over all the rows (K = the rows, not one 128-row block); the first
flush writes dW rather than adding to zeros. Rows the shifted forward hands to the online one (a target ~41
nats below the row's maximum: their stored e overflowed) get their D recomputed in the same slice loop,
P = exp(c x W^T - lse) from the merged lse: one more pass for those rows.

Frozen head (FrozenAccumulator), 2 passes (4P): dX_i = g_i U_i with
    U_i = sum_v (onehot_iv - p_iv) t'_iv W_v = t'_iy (1 - p_iy) W_y - sum_{v != y} p_iv t'_iv W_v,
accumulated in the forward beside each tile (pass 2 is the sum's GEMM). The target column is left out of
the sum and 1 - p_y = sum_{v != y} p_v is accumulated on its own: W_y - sum_v p_v W_v would cancel
catastrophically for peaked rows (p_y -> 1). Shifted tiles are relative to the fixed t, so nothing is
rescaled; online tiles are relative to a running maximum m, and A and the excluded sum are rescaled by
exp(m_old - m_new) when it rises (flash attention's rule). The backward is then g ⊙ U: no GEMM.

Memory: the workspace (slots x block_rows x V accumulation-dtype values), a flush's D buffer per worker part
(at most slots x block_rows x slice width: 1/16 of the workspace at V = 32768), dX and dW accumulators in the
accumulation dtype (fp32; for fp32 inputs they are the gradients), and U [n, H] on the frozen route.
"""

from __future__ import annotations

import torch

from . import chunked
from .chunked import Rows, Transform
from .softmax_stats import VocabPartials, logsumexp
from .torch_head import zero_gradients


class _TargetFreePart(chunked.Part):
    """A worker's part that sums, for each row of the current block, exp(z - shift) over its tiles' columns
    other than the row's target: on the shifted path the shift is t (nothing to rescale); on the online
    path it is the running maximum, and the sum is rescaled by exp(m_old - m_new) when the maximum rises.
    With the other parts' sums (combine_parts) and the row's lse this gives 1 - p_y = sum_{v != y} p_v
    without the cancellation of 1 - p_y when p_y -> 1."""

    def __init__(self, part: chunked.Part, shifted: bool):
        super().__init__(part.slices, part.first, part.acc, part._tile)
        self.shifted, self.targets, self.excl, self.row_max = shifted, None, None, None

    def reset(self, targets: torch.Tensor | None, hits: dict | None = None) -> None:
        """A new block: its rows' targets and their target_hits (None: a block of other rows)."""
        self.targets, self.hits = targets, hits
        if targets is not None:
            self.excl = torch.zeros(targets.numel(), dtype=self.acc.dtype, device=self.acc.device)
            self.row_max = torch.full_like(self.excl, float("-inf"))

    def fold(self, v0: int, tile: torch.Tensor):
        """The tile's exp(z - shift) with its target entries zeroed (on the shifted path the tile itself,
        which holds exp(z - t)), and the factor that rescaled the running sums (None on the shifted path)."""
        if self.shifted:
            q, rescale = _set_at_targets(tile, self.hits.get(v0)), None
            self.excl += q.sum(1)
            return q, rescale
        new_max = torch.maximum(self.row_max, tile.amax(1))  # the tile holds z
        rescale = torch.exp(self.row_max - new_max)
        q = _set_at_targets(torch.sub(tile, new_max[:, None]).exp_(), self.hits.get(v0))
        self.excl = self.excl * rescale + q.sum(1)
        self.row_max = new_max
        return q, rescale


def combine_parts(parts: list[_TargetFreePart], sums: list[torch.Tensor | None] = ()):
    """The block's target-free sum and running maximum (None on the shifted path) from every part, in part
    order, and each of `sums` (one per part, relative to that part's maximum) on the same footing."""
    if parts[0].shifted:
        scales = [None] * len(parts)
        row_max = None
    else:
        row_max = torch.stack([p.row_max for p in parts]).amax(0)
        scales = [torch.exp(p.row_max - row_max) for p in parts]

    def total(values):
        return chunked._sum_in_order([v if s is None else v * (s if v.dim() == 1 else s[:, None])
                                      for v, s in zip(values, scales)])

    return total([p.excl for p in parts]), row_max, [total(values) for values in sums]


def one_minus_target_prob(excl: torch.Tensor, row_max: torch.Tensor | None, partials: VocabPartials) -> torch.Tensor:
    """sum_{v != y} p_v from combine_parts' sums: excl / S relative to the same shift."""
    if row_max is None:  # shifted: relative to t, as sum_exp is
        return excl / partials.sum_exp
    return excl * torch.exp(row_max - logsumexp(partials))


class _SlotPart(_TargetFreePart):
    """A worker's part whose tiles land in the current workspace slot: slice (v0, v1) of a block of n rows
    at [v0 * block_rows, v0 * block_rows + n (v1 - v0)) of the slot, a contiguous [n, v1 - v0] tile."""

    def __init__(self, part: chunked.Part, shifted: bool, block_rows: int):
        super().__init__(part, shifted)
        self.block_rows, self.slot, self.scratch = block_rows, None, False

    def tile_for(self, n_rows: int, v0: int, v1: int) -> torch.Tensor:
        return super().tile_for(n_rows, v0, v1) if self.scratch else self.stored(n_rows, v0, v1)

    def stored(self, n_rows: int, v0: int, v1: int, slot: torch.Tensor | None = None) -> torch.Tensor:
        start = v0 * self.block_rows
        slot = self.slot if slot is None else slot
        return slot[start: start + n_rows * (v1 - v0)].view(n_rows, v1 - v0)

    def done(self, v0: int, v1: int, tile: torch.Tensor) -> None:
        if not self.scratch:
            self.fold(v0, tile)  # zeroes the stored e_y on the shifted path: d_logits sets that entry anew


class _SlotBuffers(chunked.BlockBuffers):
    """The forward's buffers, with the parts' tiles in workspace slots for the blocks of `x`; the online
    rerun of a block's rows far below their maximum (chunked.forward_block) uses the scratch tiles."""

    def __init__(self, x: Rows, vocab_size: int, shifted: bool):
        super().__init__(x, vocab_size)
        self.x = x
        self.parts = [_SlotPart(part, shifted, self.rows.shape[0]) for part in self.parts]

    def start_block(self, x: Rows, r0: int, r1: int) -> None:
        for part in self.parts:
            part.scratch = x is not self.x


class StoredLogits:
    """The trainable route's workspace and gradient accumulators for the scored rows `x`.

    forward(k) computes token block k into a free slot; backward_rows(k, a, b, grad) turns rows [a, b) of
    block k into d_logits and adds their dX, dW and db; release(k) frees the block's slot. The backward of
    the blocks released together (a chosen and a rejected block, mostly) runs at the next forward or
    merged_partials, all at once: each vocabulary slice of W and dW is read from memory once for all of
    them, not once per block (on shared cores memory bandwidth, not arithmetic, bounds these GEMMs).
    """

    def __init__(self, x: Rows, weight, bias, transform: Transform, with_stats: bool, n_slots: int, *,
                 need_dx: bool, need_dw: bool, need_db: bool):
        self.x, self.weight, self.bias, self.transform, self.with_stats = x, weight, bias, transform, with_stats
        vocab_size, device = weight.shape[0], weight.device
        self.shifted = chunked.is_shifted(transform, bias)
        self.buffers = _SlotBuffers(x, vocab_size, self.shifted)
        block_rows = self.buffers.rows.shape[0]
        self.weight_sum = chunked.shifted_weight_sum(x, weight, with_stats) if self.shifted else None
        self.blocks = chunked.token_blocks(len(x))
        self.slots = torch.empty(n_slots, block_rows * vocab_size, dtype=x.dtype, device=device)
        self.free, self.slot_of = list(range(n_slots - 1, -1, -1)), {}
        self.partials, self.target_gap, self.rerun = {}, {}, {}
        self.pending, self.releasing = [], []  # backward_rows' (k, a, b, grad) and the released blocks, until _flush

        self.dx, self.dw, self.db = zero_gradients(x.hidden, weight, x.dtype, need_dx, need_dw and not self.shifted,
                                                   need_db and bias is not None)
        # The shifted backward's first GEMM of each slice writes dW, rather than adding to zeros (_shifted_backward).
        self.dw_written = not (need_dw and self.shifted)
        if not self.dw_written:
            self.dw = torch.empty(weight.shape, dtype=x.dtype, device=device)

    @staticmethod
    def block_rows(x: Rows) -> int:
        return chunked.TOKEN_BLOCK

    @staticmethod
    def slot_bytes(x: Rows, vocab_size: int) -> int:
        return max(1, min(chunked.TOKEN_BLOCK, len(x))) * vocab_size * torch.finfo(x.dtype).bits // 8

    def _use_slot(self, k: int) -> None:
        for part in self.buffers.parts:
            part.slot = self.slots[self.slot_of[k]]

    def forward(self, k: int) -> VocabPartials:
        """Block k's merged partials (the two-pass path's bits), its tiles kept."""
        self._flush()
        self.slot_of[k] = self.free.pop()
        self._use_slot(k)
        r0, r1 = self.blocks[k]
        hits = target_hits(self.x.targets[r0:r1], self.buffers.slice_width)
        for part in self.buffers.parts:
            part.reset(self.x.targets[r0:r1], hits)
        partials = chunked.forward_block(self.x, r0, r1, self.weight, self.bias, self.transform, self.with_stats,
                                         self.buffers, self.weight_sum)
        # Rows the shifted forward handed to the online path (a target far below its row's maximum, or
        # inf/NaN): their stored tiles overflowed, so their gradients are recomputed (backward_rows).
        self.rerun[k] = ~(partials.max == partials.target_logit) if self.shifted else None
        self.partials[k] = partials
        excl, row_max, _ = combine_parts(self.buffers.parts)
        self.target_gap[k] = one_minus_target_prob(excl, row_max, partials)
        return partials

    def merged_partials(self) -> VocabPartials:
        """Every block's partials, in row order (and every queued backward done)."""
        self.complete()
        return chunked._cat([self.partials[k] for k in range(len(self.blocks))])

    def complete(self) -> None:
        """Runs the queued backward of every released block (the gradients are final after it)."""
        self._flush()
        if not self.dw_written:  # no row reached the backward
            self.dw.zero_()
            self.dw_written = True

    def release(self, k: int) -> None:
        self.releasing.append(k)  # its slot is free once its queued backward has run (_flush)

    def backward_rows(self, k: int, a: int, b: int, grad: torch.Tensor) -> None:
        """Queues rows [a, b) of block k (grad: their dloss/dlogp) for their d_logits, dX, dW and db (_flush)."""
        self.pending.append(_Rows(self, k, a, b, grad))

    def _flush(self) -> None:
        """The queued rows' backward, the shifted blocks' together, then their released slots freed."""
        pending, self.pending = self.pending, []
        if pending and self.shifted:
            self._shifted_backward(pending)
        for rows in pending:
            if not self.shifted:
                self._online_backward(rows)
            if self.dx is not None:
                self.dx.index_copy_(0, rows.rows, rows.dx)
            if rows.rerun.numel():
                self._rows_recomputed(rows.k, rows.a, rows.rerun, rows.grad)
        for k in self.releasing:
            self.free.append(self.slot_of.pop(k))
        self.releasing = []

    def _rows_recomputed(self, k: int, a: int, which: torch.Tensor, grad: torch.Tensor) -> None:
        """Called once the rows `which` (indices from row a of block k) have had their gradients recomputed (grad:
        the loss gradient of rows a onwards); a vocabulary shard takes back the one-hot of a borrowed target here."""

    def _stored_tiles(self, part: "_SlotPart", v0: int, v1: int, rows: "_Rows") -> torch.Tensor:
        """Rows [a, b) of the part's stored tile (v0, v1) of block k."""
        return part.stored(rows.n_block, v0, v1, self.slots[self.slot_of[rows.k]])[rows.a:rows.b]

    def _shifted_backward(self, pending: list["_Rows"]) -> None:
        """D = c g (onehot - e / S) from the stored tiles (the stored e_y is 0, see _SlotPart.done), its target entry
        c g (1 - p_y), for every queued row at once: each part forms a slice's D for all of them in one buffer, then
        two GEMMs (dX rows, dW's slice), so W's and dW's slice are read once per flush and dW's GEMM sums over all
        the rows. Rows whose stored e overflowed (`rerun`) get their D recomputed from the merged lse."""
        group = _FlushGroup(self, pending)
        need_dx, write_dw = self.dx is not None, not self.dw_written

        def part_grads(part: _SlotPart):
            share = None
            d_all = part.acc.new_empty(group.n_rows, self.buffers.slice_width)
            for v0, v1 in part.slices:
                w = self.weight[v0:v1].to(part.acc.dtype)
                d_raw = group.d_logits(part, v0, v1, w, d_all[:, : v1 - v0])
                if need_dx:
                    share = torch.mm(d_raw, w) if share is None else share.addmm_(d_raw, w)
                if self.dw is not None:
                    chunked.add_tile_gradients(d_raw, w, group.x, None, self.dw, None, v0, v1, overwrite_dw=write_dw)
            return share

        shares = chunked.Workers.map(part_grads, self.buffers.parts)
        self.dw_written = True
        if need_dx:
            dx = chunked._sum_in_order(shares)
            for rows, (start, stop) in zip(pending, group.spans):
                rows.dx = dx[start:stop]

    def _online_backward(self, rows: "_Rows") -> None:
        """Each stored tile of z becomes g (onehot - exp(z - lse)) t'(z), its target entry g (1 - p_y) t'_y."""
        k, a, b, targets, grad, target_entry = rows.k, rows.a, rows.b, rows.targets, rows.grad, rows.target_entry
        xr = self.x.hidden.index_select(0, rows.rows).to(self.x.dtype)
        lse = logsumexp(self.partials[k])[a:b]
        hits = target_hits(targets, self.buffers.slice_width)

        def part_grads(part: _SlotPart):
            share = part.acc[: b - a].zero_() if self.dx is not None else None
            for v0, v1 in part.slices:
                tile = self._stored_tiles(part, v0, v1, rows)
                d_z = _set_at_targets(chunked._logits_gradient(tile, targets - v0, lse, grad), hits.get(v0),
                                      target_entry)
                d_raw = self.transform.scale_gradient_(d_z, tile)
                chunked.add_tile_gradients(d_raw, self.weight[v0:v1].to(xr.dtype), xr, share, self.dw, self.db, v0, v1)
            return share

        shares = chunked.Workers.map(part_grads, self.buffers.parts)
        rows.dx = chunked._sum_in_order(shares) if self.dx is not None else None

class _Rows:
    """Rows [a, b) of token block k queued for the backward: their targets, loss gradient, g (1 - p_y), the rows
    whose tiles are recomputed (`rerun`: their stored e overflowed; _FlushGroup overwrites their D), and later
    their dX rows."""

    def __init__(self, head: StoredLogits, k: int, a: int, b: int, grad: torch.Tensor):
        r0, r1 = head.blocks[k]
        self.k, self.a, self.b, self.n_block = k, a, b, r1 - r0
        self.rows, self.targets = head.x.rows[r0 + a: r0 + b], head.x.targets[r0 + a: r0 + b]
        self.grad = grad.to(head.x.dtype)
        rerun = head.rerun[k][a:b] if head.rerun[k] is not None else self.rows.new_zeros(b - a, dtype=torch.bool)
        self.rerun = rerun.nonzero().squeeze(1)
        self.target_entry = self.grad * head.target_gap[k][a:b].nan_to_num(0, 0, 0)  # g (1 - p_y)
        self.dx = None


class _FlushGroup:
    """The queued rows of a shifted flush, concatenated: their hidden rows, row scales -c g / S, target entries
    c g (1 - p_y) and targets, and for the rows to recompute (`rerun`) what their tiles need."""

    def __init__(self, head: StoredLogits, pending: list[_Rows]):
        factor = head.transform.linear_factor
        self.head, self.pending = head, pending
        sizes = [rows.b - rows.a for rows in pending]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        self.spans = [(a, a + n) for a, n in zip(starts, sizes)]
        self.n_rows = sum(sizes)
        x = head.x
        self.x = x.hidden.index_select(0, torch.cat([rows.rows for rows in pending])).to(x.dtype)
        self.row_scale = torch.cat([-(factor * rows.grad / head.partials[rows.k].sum_exp[rows.a:rows.b])
                                    for rows in pending])[:, None]
        self.target_entry = torch.cat([factor * rows.target_entry for rows in pending])
        self.hits = target_hits(torch.cat([rows.targets for rows in pending]), head.buffers.slice_width)
        rerun = [rows.rerun + a for rows, (a, _) in zip(pending, self.spans)]
        self.rerun = torch.cat(rerun)
        if self.rerun.numel():
            self.rerun_x = self.x.index_select(0, self.rerun)
            self.rerun_neg_lse = -torch.cat([logsumexp(head.partials[rows.k])[rows.a + rows.rerun]
                                             for rows in pending])[:, None]
            self.rerun_grad = factor * torch.cat([rows.grad[rows.rerun] for rows in pending])
            self.rerun_hits = target_hits(torch.cat([rows.targets[rows.rerun] for rows in pending]),
                                          head.buffers.slice_width)

    def d_logits(self, part: "_SlotPart", v0: int, v1: int, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """D of slice (v0, v1) for every row, in `out` [rows, v1 - v0]."""
        head = self.head
        for rows, (start, stop) in zip(self.pending, self.spans):
            torch.mul(head._stored_tiles(part, v0, v1, rows), self.row_scale[start:stop], out=out[start:stop])
        _set_at_targets(out, self.hits.get(v0), self.target_entry)
        if self.rerun.numel():  # their stored e overflowed: P = exp(c x W^T - lse), D = c g (onehot - P)
            d = torch.addmm(self.rerun_neg_lse, self.rerun_x, w.T, alpha=head.transform.linear_factor)
            d.exp_().mul_(-self.rerun_grad[:, None])
            hit = self.rerun_hits.get(v0)
            if hit is not None:
                d[hit] += self.rerun_grad[hit[0]]
            out.index_copy_(0, self.rerun, d)
        return out


def target_hits(targets: torch.Tensor, slice_width: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each vocabulary slice [v0, v0 + slice_width) holding some row's target: v0 -> (rows, columns in
    the slice). Found once per block, so that a tile without targets (most of them) costs no ops here."""
    slices = torch.div(targets, slice_width, rounding_mode="floor")
    order = torch.argsort(slices, stable=True)
    first, counts = torch.unique_consecutive(slices[order], return_counts=True)
    counts = counts.tolist()
    columns = (targets - slices * slice_width)[order]
    return {s * slice_width: (rows, cols)
            for s, rows, cols in zip(first.tolist(), order.split(counts), columns.split(counts))}


def _set_at_targets(tile: torch.Tensor, hit: tuple[torch.Tensor, torch.Tensor] | None,
                    values: torch.Tensor | None = None) -> torch.Tensor:
    """tile[rows, columns] = values[rows] (0 without values) for target_hits' entry of the tile (or none)."""
    if hit is not None:
        rows, cols = hit
        tile[rows, cols] = 0 if values is None else values[rows]
    return tile


class _FrozenPart(_TargetFreePart):
    """A worker's part that also folds each finished tile into its share A of sum_{v != y} p_v t'_v W_v
    (unnormalised, relative to the same shift as the target-free sum)."""

    def __init__(self, part: chunked.Part, owner: "FrozenAccumulator"):
        super().__init__(part, owner.shifted)
        self.owner, self.a = owner, torch.empty_like(part.acc)

    def reset(self, targets: torch.Tensor | None, hits: dict | None = None) -> None:
        super().reset(targets, hits)
        if targets is not None:
            self.a[: targets.numel()].zero_()

    def done(self, v0: int, v1: int, tile: torch.Tensor) -> None:
        if self.targets is None:  # a block of other rows (see FrozenAccumulator)
            return
        a, transform = self.a[: self.targets.numel()], self.owner.transform
        q, rescale = self.fold(v0, tile)
        weighted = q if self.shifted else transform.scale_gradient_(q, tile)  # the shifted path's t' = c comes last
        if rescale is not None:
            a.mul_(rescale[:, None])
        a.addmm_(weighted, self.owner.weight[v0:v1].to(tile.dtype))


class FrozenAccumulator(chunked.BlockBuffers):
    """Forward buffers that also accumulate U (see the module docstring) for every scored row of `x`.

    Pass it to chunked.forward_partials, then call finish(merged) for U [rows, H]. Blocks of other rows
    (the shifted forward's online rerun of rows above SHIFTED_SUM_LIMIT) are skipped here and finished by
    the two-pass backward with g = 1, for those rows only.
    """

    def __init__(self, x: Rows, weight, bias, transform: Transform):
        super().__init__(x, weight.shape[0])
        self.x, self.weight, self.bias, self.transform = x, weight, bias, transform
        self.shifted = chunked.is_shifted(transform, bias)
        self.parts = [_FrozenPart(part, self) for part in self.parts]
        self.a = torch.zeros(len(x), x.hidden.shape[1], dtype=x.dtype, device=x.hidden.device)
        self.excl = torch.zeros(len(x), dtype=x.dtype, device=x.hidden.device)
        self.row_max = torch.zeros_like(self.excl)
        self.block = None

    def start_block(self, x: Rows, r0: int, r1: int) -> None:
        self._flush()
        self.block = (r0, r1) if x is self.x else None
        targets = None if self.block is None else x.targets[r0:r1]
        hits = None if targets is None else target_hits(targets, self.slice_width)
        for part in self.parts:
            part.reset(targets, hits)

    def _flush(self) -> None:
        """The current block's parts, combined in part order into its rows of A, excl and row_max."""
        if self.block is None:
            return
        r0, r1 = self.block
        excl, row_max, (a,) = combine_parts(self.parts, [[p.a[: r1 - r0] for p in self.parts]])
        self.a[r0:r1], self.excl[r0:r1] = a, excl
        if row_max is not None:
            self.row_max[r0:r1] = row_max
        self.block = None

    def finish(self, merged: VocabPartials) -> torch.Tensor:
        """U [rows, H] in the accumulation dtype (A's storage), from the whole vocabulary's partials:
        U = t'_y (1 - p_y) W_y - A / S, with S the softmax's denominator relative to A's shift."""
        self._flush()
        x, lse = self.x, logsumexp(merged)
        w_target = chunked.gather_rows(self.weight, x.targets, torch.empty_like(self.a))
        z_target = merged.target_logit
        if self.shifted:
            total, row_max = merged.sum_exp, None
            target_slope = torch.ones_like(z_target)  # c comes in below
        else:
            total, row_max = torch.exp(lse - self.row_max), self.row_max
            target_slope = self.transform.scale_gradient_(torch.ones_like(z_target), z_target)
        gap = one_minus_target_prob(self.excl, row_max, merged)
        u = self.a.div_(-total[:, None]).add_(w_target.mul_((target_slope * gap)[:, None]))
        if self.shifted:
            u.mul_(self.transform.linear_factor)
            rerun = ~(merged.max == merged.target_logit)  # rows the online path finished (see forward_partials)
            if bool(rerun.any()):
                u[rerun] = self._two_pass_rows(rerun, lse)
        return u

    def _two_pass_rows(self, which: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """U of a few rows from the two-pass backward with g = 1 (its d_logits are formed in fp32)."""
        x = self.x.subset(which)
        local = Rows(x.hidden.index_select(0, x.rows), torch.arange(len(x), device=x.rows.device), x.targets)
        u = torch.zeros(len(x), x.hidden.shape[1], dtype=self.a.dtype, device=self.a.device)
        # These buffers, so the rows meet the vocabulary in the forward's slices and worker parts (buffers sized for
        # a few rows would take the whole vocabulary as one slice, on one thread).
        chunked.backward(local, self.weight, self.bias, lse[which], torch.ones_like(lse[which]), self.transform,
                         dx=u, dw=None, db=None, buffers=self)
        return u
