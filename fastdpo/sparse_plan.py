"""Which (token block, vocabulary tile) pairs the backward may skip, decided before any recompute.

The forward keeps, per vocabulary tile j and row i, the tile's logsumexp; with the row's lse it gives
the tile's exact probability mass p_ij = exp(lse_ij - lse_i). The backward's d_logits on a tile is
g_i (onehot - softmax): dropping tile j from row i drops |g_i| p_ij of L1 norm (the onehot part is
never dropped: tiles holding a target are always kept). A pair (token block M, tile j) is one unit of
work, so it is skipped only if every row of M can afford it:

    for each block M, tiles sorted by max_{i in M} p_ij (ascending), the longest prefix S with
        max_{i in M} sum_{j in S} p_ij <= tolerance
    is dropped.

Each row then drops at most `tolerance` of probability mass in total, so the dropped part of its
d_logits has L1 norm <= |g_i| tolerance, its dX error is <= |g_i| tolerance max_v ||W_v|| and dW's
error in column h is <= tolerance sum_i |g_i x_ih|. A flat distribution (every tile about 1/tiles of
the mass) keeps everything whenever 1/tiles > tolerance: the budget, unlike a per-element threshold,
bounds the total.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def kept_pairs(tile_lse: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, block_m: int, block_v: int,
               tolerance: float) -> torch.Tensor:
    """bool [token blocks, vocabulary tiles]: the pairs the backward must compute (tile_lse: [tiles, n])."""
    n_tiles, n_rows = tile_lse.shape
    n_blocks = -(-n_rows // block_m)
    mass = torch.exp(tile_lse - lse[None, :])  # NaN stays NaN and is never dropped (comparisons fail)
    mass = torch.nn.functional.pad(mass, (0, n_blocks * block_m - n_rows)).view(n_tiles, n_blocks, block_m)
    return keep_within_budget(mass.transpose(0, 1), target_tiles(targets, n_blocks, n_tiles, block_m, block_v),
                              tolerance)


def target_tiles(targets: torch.Tensor, n_blocks: int, n_tiles: int, block_m: int, block_v: int) -> torch.Tensor:
    """bool [token blocks, vocabulary tiles]: the pairs that hold some row's target."""
    holds_target = torch.zeros(n_blocks, n_tiles, dtype=torch.bool, device=targets.device)
    row_block = torch.arange(targets.numel(), device=targets.device) // block_m
    holds_target[row_block, targets // block_v] = True
    return holds_target


def keep_within_budget(mass: torch.Tensor, holds_target: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The pairs to keep, from mass [blocks, tiles, rows] (a row of a block may stand for several: its
    mass must then be their maximum, which keeps the bound)."""
    cost = mass.amax(dim=2).masked_fill(holds_target, float("inf"))
    order = cost.argsort(dim=1, stable=True)
    sorted_mass = mass.gather(1, order[:, :, None].expand_as(mass))
    # Running dropped mass of the worst row: non-decreasing along the sorted tiles, so the droppable
    # tiles are a prefix. fp64 keeps the sum's rounding far below any tolerance.
    worst_row = sorted_mass.double().cumsum(dim=1).amax(dim=2)
    dropped_sorted = (worst_row <= tolerance) & ~holds_target.gather(1, order)
    return torch.ones_like(holds_target).scatter_(1, order, ~dropped_sorted)


class PairLists(NamedTuple):
    """The kept pairs of vocabulary tiles [first_tile, first_tile + tiles), in both orders.

    Row-major (by token block): pair k = (pair_block[k], pair_tile[k]), block M's pairs are
    block_start[M]:block_start[M+1]; d_logits tile k sits in slot k of the workspace.
    Column-major (by tile): tile j's pairs are tile_start[j]:tile_start[j+1], with blocks csc_block
    and workspace slots csc_slot.
    """

    first_tile: int
    pair_block: torch.Tensor
    pair_tile: torch.Tensor
    block_start: torch.Tensor
    tile_start: torch.Tensor
    csc_block: torch.Tensor
    csc_slot: torch.Tensor

    @property
    def count(self) -> int:
        return self.pair_block.numel()


def pair_lists(kept: torch.Tensor, first_tile: int, last_tile: int) -> PairLists:
    sub = kept[:, first_tile:last_tile]
    pair_block, pair_tile = sub.nonzero(as_tuple=True)
    slot = (sub.flatten().cumsum(0) - 1).view_as(sub)
    csc_tile, csc_block = sub.T.nonzero(as_tuple=True)

    def starts(counts):
        return torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)

    return PairLists(first_tile, pair_block.to(torch.int32), (pair_tile + first_tile).to(torch.int32),
                     starts(sub.sum(1)), starts(sub.sum(0)), csc_block.to(torch.int32),
                     slot[csc_block, csc_tile].to(torch.int32))


def tile_chunks(kept: torch.Tensor, max_pairs: int) -> list[tuple[int, int]]:
    """Consecutive vocabulary-tile ranges with at most max_pairs kept pairs each (at least one tile)."""
    per_tile = kept.sum(0).tolist()
    chunks, start, pairs = [], 0, 0
    for tile, count in enumerate(per_tile):
        if tile > start and pairs + count > max_pairs:
            chunks.append((start, tile))
            start, pairs = tile, 0
        pairs += count
    chunks.append((start, len(per_tile)))
    return chunks
