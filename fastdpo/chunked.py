"""The PyTorch path (CPU, or any device without Triton): the fused kernels' algorithm in torch tiles.

Same two-pass design as the Triton kernels: the forward folds (tokens x vocab) logits tiles into
per-token softmax statistics and keeps only lse per token; the backward recomputes each tile and
turns it into dX / dW / db contributions. At most one logits tile of TILE_ELEMENTS values per worker
exists at a time, and the hidden states are read through row indices, never copied whole.

Loops run token-block-outer: a block of hidden rows is gathered once and meets every vocabulary
slice. The slices of a block are split into one contiguous part per thread; each part runs on its
own single-threaded worker and the parts are combined in a fixed order (see `Workers`).

Two variants of each pass:
- linear heads (no softcap, no bias: the common case) shift every tile by the row's target logit
  (fused into the GEMM) and pull the per-token gradient scalar out of the tiles, so a tile costs its
  GEMMs and one exp; the statistics, when asked for, are computed beside the same tiles;
- softcap and bias use the online-softmax partials of fastdpo.softmax_stats and the explicit
  d_logits tile.
The variant depends only on the head (never on statistics or gradients), so the log-probs of the
same inputs are the same bits with or without statistics, for the policy and the reference alike.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .softmax_stats import VocabPartials, logsumexp, merge
from .sparse_plan import keep_within_budget, target_tiles
from .transform import LogitTransform

# 2^18 values (1 MiB in fp32) per logits tile: 128 token rows x 2048 vocabulary columns. A tile costs about a
# dozen Python-level torch calls whatever its size, and each of its GEMMs packs its slice of W once, so wider
# tiles amortise both. On 2 idle cores (the quick benchmark's fused route: 1273 scored tokens, H=256, V=65536,
# fwd+bwd) a step took 1,002 ms at 2^15, 894 at 2^17 and 847 at 2^18; 2^19 was within noise of 2^18. What it
# costs is memory: each worker's tile, and the fused route's flush buffer (fastdpo.torch_fused), whose rows
# are a slice wide. Smaller tiles or 64-row blocks cost more, through more Python-level iterations.
TILE_ELEMENTS = 1 << 18
TOKEN_BLOCK = 128
# Vocabulary slices are whole multiples of this (GEMM kernels prefer aligned widths).
VOCAB_ALIGN = 128
# The shifted forward keeps a row when its sum of exp(z - target logit) stays below this: then every
# exp(z - t) <= 2^60 and their squares (for log sum p^2) cannot overflow float32. Rows above it (target
# more than ~41 nats below the row's best logit), inf or NaN go through the online path instead.
SHIFTED_SUM_LIMIT = 2.0**60


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def vocab_slices(vocab_size: int, token_block: int):
    width = max(VOCAB_ALIGN, TILE_ELEMENTS // token_block // VOCAB_ALIGN * VOCAB_ALIGN)
    return [(v0, min(v0 + width, vocab_size)) for v0 in range(0, vocab_size, width)]


def token_blocks(n_rows: int):
    return [(r0, min(r0 + TOKEN_BLOCK, n_rows)) for r0 in range(0, n_rows, TOKEN_BLOCK)]


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` cut into `parts` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(parts)]


class Workers:
    """Runs one function per part of a token block's vocabulary, each part on its own thread.

    Why not torch's own threads: every torch op is an OpenMP region whose threads meet at a barrier,
    and this path issues thousands of small ops per step. When another process occupies a core, each
    barrier waits for a descheduled thread (a scheduler time slice), and a step that takes 2.3 s idle
    took 80-130 s. Here every worker runs its ops single-threaded, so the threads meet once per token
    block instead of once per op. The parts are combined in a fixed order, so the result depends on the
    number of parts (torch.get_num_threads()) but never on the scheduling.
    """

    _lock = threading.Lock()
    _pool: ThreadPoolExecutor | None = None
    _pool_key = None  # (size, pid) of _pool
    _caller = threading.local()  # .threads: the caller's thread count while serial_caller holds it at 1

    @staticmethod
    def count(n_slices: int) -> int:
        return max(1, min(Workers.threads(), n_slices))

    @classmethod
    def threads(cls) -> int:
        """The caller's torch thread count (as it was outside serial_caller)."""
        return getattr(cls._caller, "threads", None) or torch.get_num_threads()

    @classmethod
    @contextlib.contextmanager
    def serial_caller(cls):
        """The calling thread's own ops single-threaded for the duration of a pass (also a decorator).

        Between token blocks the caller runs many ops on a few hundred values (merges, logs, the loss and its
        gradient). Once any thread has called torch.set_num_threads (our workers do), MKL's dynamic
        threading is off for the process and its vector math (exp, log) runs every such op as an OpenMP
        region of all the caller's threads: 3.5 us instead of 1.3 on idle cores, and 20 ms per op measured
        on 2 cores shared with other processes, whose scheduler must first run the region's second thread.
        The workers meanwhile wait for the caller. Elementwise ops give the same bits on any thread count;
        reductions may not, so every route computes the same values under the same rule (all inside)."""
        if getattr(cls._caller, "threads", None) is not None or torch.get_num_threads() == 1:
            yield
            return
        cls._caller.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(cls._caller.threads)
            cls._caller.threads = None

    @classmethod
    def map(cls, fn, parts: list) -> list:
        if len(parts) == 1:
            return [fn(parts[0])]
        return list(cls._executor(len(parts)).map(_without_grad(fn), parts))

    @classmethod
    def _executor(cls, size: int) -> ThreadPoolExecutor:
        key = (size, os.getpid())  # a forked child must not reuse its parent's (dead) threads
        with cls._lock:
            if cls._pool_key != key:
                if cls._pool is not None and cls._pool_key is not None and cls._pool_key[1] == os.getpid():
                    cls._pool.shutdown(wait=False)
                main_threads = torch.get_num_threads()
                started = threading.Barrier(size)
                pool = ThreadPoolExecutor(size, thread_name_prefix="fastdpo-chunked", initializer=_single_threaded)
                list(pool.map(lambda _: started.wait(), range(size)))  # start (and initialise) every worker now
                # torch.set_num_threads in the workers also stored 1 as the default of threads started later.
                torch.set_num_threads(main_threads)
                cls._pool, cls._pool_key = pool, key
            return cls._pool


def _without_grad(fn):
    def run(part):
        with torch.no_grad():  # grad mode is per thread: the autograd function's no_grad does not reach here
            return fn(part)
    return run


def _single_threaded() -> None:
    torch.get_num_threads()  # this thread's lazy thread-count initialisation first, so it cannot undo the next line
    torch.set_num_threads(1)


class Transform:
    """z = transform(raw) and dz/draw of a LogitTransform on torch tiles, TRL's order: scale, softcap, temperature."""

    def __init__(self, transform: LogitTransform):
        self.logit_scale, self.softcap = transform.logit_scale, transform.softcap
        self.inv_temperature = 1.0 / transform.temperature

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

    def subset(self, which: torch.Tensor) -> "Rows":
        return Rows(self.hidden, self.rows[which], self.targets[which])


def gather_rows(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """source[index] written into the first len(index) rows of `out` (converted to out's dtype)."""
    out = out[: index.numel()]
    if source.dtype == out.dtype:
        return torch.index_select(source, 0, index, out=out)
    return out.copy_(source.index_select(0, index))


class Part:
    """One worker's share of a token block: its vocabulary slices (the first is slice number `first` of
    the pass), a [block, H] accumulator and a tile."""

    def __init__(self, slices, first: int, acc: torch.Tensor, tile: torch.Tensor):
        self.slices, self.first, self.acc, self._tile = slices, first, acc, tile

    def tile_for(self, n_rows: int, v0: int, v1: int) -> torch.Tensor:
        """A contiguous [n_rows, v1 - v0] logits tile."""
        return self._tile[: n_rows * (v1 - v0)].view(n_rows, v1 - v0)

    def done(self, v0: int, v1: int, tile: torch.Tensor) -> None:
        """Called by the forward once a tile is final: exp(z - shift) on the shifted path, z on the online
        path. Nothing here; the fused passes (fastdpo.torch_fused) keep or consume the tile."""


class BlockBuffers:
    """The [block, H] and [block, slice] buffers that every token block reuses.

    One allocation per step (the autograd function hands the forward's to the backward), not a few
    per block. Measured on the quick benchmark: with per-block buffers a step's peak RSS ranged over
    67.3-68.3 MiB between processes at V=65536 (66.0 MiB of gradients); with one buffer per pass,
    34.6-35.1 MiB at V=32768 (34.0 of gradients), and with one per step 34.5-34.9. The vocabulary
    slices are fixed so that the last, shorter block fits the same tile. Each part (worker) has its
    own accumulator and tile; the gathered rows are shared.
    """

    def __init__(self, x: Rows, vocab_size: int):
        block_rows = max(1, min(TOKEN_BLOCK, len(x)))
        slices = vocab_slices(vocab_size, block_rows)
        n_parts = Workers.count(len(slices))
        rows_size = block_rows * x.hidden.shape[1]
        tile_size = block_rows * (slices[0][1] - slices[0][0])
        storage = torch.empty(rows_size + n_parts * (rows_size + tile_size), dtype=x.dtype, device=x.hidden.device)
        self.rows = storage[:rows_size].view(block_rows, -1)  # the block's hidden rows
        self.parts, first = [], 0
        for k, part_slices in enumerate(split_evenly(slices, n_parts)):
            start = rows_size + k * (rows_size + tile_size)
            acc = storage[start: start + rows_size].view(block_rows, -1)  # W[targets], or a share of dX
            self.parts.append(Part(part_slices, first, acc, storage[start + rows_size: start + rows_size + tile_size]))
            first += len(part_slices)
        self.slice_width, self.n_slices = slices[0][1] - slices[0][0], len(slices)
        # With a gradient tolerance, the forward plans each token block's backward as soon as the block's
        # masses are known (fastdpo.sparse_plan's per-row budget): one list of kept slices per block.
        self.kept: list[list[bool]] | None = None

    def start_block(self, x: "Rows", r0: int, r1: int) -> None:
        """Called by the forward before each token block of `x` (the fused passes place the block's tiles)."""


def _weight_slice(weight, bias, v0, v1, dtype):
    return weight[v0:v1].to(dtype), None if bias is None else bias[v0:v1].to(dtype)


def _stack(parts: list[VocabPartials]) -> VocabPartials:
    return VocabPartials(*(None if field[0] is None else torch.stack(field) for field in zip(*parts)))


def _cat(parts: list[VocabPartials]) -> VocabPartials:
    return VocabPartials(*(None if field[0] is None else torch.cat(field) for field in zip(*parts)))


# --- forward -------------------------------------------------------------------------------------


@Workers.serial_caller()
def forward_partials(x: Rows, weight, bias, transform: Transform, with_stats: bool,
                     buffers: BlockBuffers | None = None, tolerance: float = 0.0) -> VocabPartials:
    """Merged softmax partials of the scored rows over the whole vocabulary.

    The log-probs (target_logit - max - log sum_exp) do not depend on `with_stats`: the statistics
    are computed beside the same tiles, never instead of them. With a gradient `tolerance`,
    buffers.kept receives the slices each token block's backward must compute.
    """
    buffers = buffers or BlockBuffers(x, weight.shape[0])
    buffers.kept, buffers.tolerance = ([] if tolerance > 0 else None), tolerance
    if not is_shifted(transform, bias):
        return _online_forward(x, weight, bias, transform, with_stats, buffers)
    weight_sum = shifted_weight_sum(x, weight, with_stats)
    return _cat([forward_block(x, r0, r1, weight, bias, transform, with_stats, buffers, weight_sum)
                 for r0, r1 in token_blocks(len(x))])


def is_shifted(transform: Transform, bias) -> bool:
    """Whether the forward shifts by the target logit (linear heads) rather than folding online partials."""
    return transform.is_linear and bias is None


def shifted_weight_sum(x: Rows, weight, with_stats: bool):
    # sum_v z_iv = c x_i . sum_v W_v: the mean logit without the cancellation of sum_v (z_iv - t_i) + V t_i
    return torch.sum(weight, 0, dtype=x.dtype) if with_stats else None


def forward_block(x: Rows, r0: int, r1: int, weight, bias, transform: Transform, with_stats: bool,
                  buffers: BlockBuffers, weight_sum=None) -> VocabPartials:
    """One token block's merged partials, as forward_partials computes them (weight_sum: see
    shifted_weight_sum). Everything stays within the block, so the fused passes can take blocks in
    any order and get the same bits."""
    if not is_shifted(transform, bias):
        return _online_block(x, r0, r1, weight, bias, transform, with_stats, buffers)
    partials = _shifted_block(x, r0, r1, weight, transform.linear_factor, weight_sum, buffers)
    # A logit far above its row's target logit (or NaN/inf in the input): that row, and only that
    # row, goes through the online path, which rescales by the running maximum and propagates NaN.
    unsafe = ~(partials.sum_exp <= SHIFTED_SUM_LIMIT)
    if not bool(unsafe.any()):
        return partials
    buffers.kept = None  # the planned masses are not all exact: the backward stays dense
    rows = Rows(x.hidden, x.rows[r0:r1][unsafe], x.targets[r0:r1][unsafe])
    online = _online_forward(rows, weight, bias, transform, with_stats, buffers)
    if with_stats:
        online = online._replace(is_top1=_top1(online))
    return VocabPartials(*(None if mine is None else mine.index_put((unsafe,), theirs)
                           for mine, theirs in zip(partials, online)))


def _top1(p: VocabPartials) -> torch.Tensor:
    return (p.target_logit >= p.max) & (p.target_logit > p.max_before_target)


def _shifted_block(x: Rows, r0, r1, weight, factor: float, weight_sum, buffers: BlockBuffers) -> VocabPartials:
    """lse without a max pass: every tile is exponentiated relative to the row's target logit t.

    Any value a row actually attains is a safe shift for its logsumexp: logits far below it underflow
    to 0 and add nothing that float32 could hold next to exp(0) = 1. The shift is fused into the GEMM
    (addmm's broadcast input), so a tile costs one GEMM, one in-place exp and one row sum. Partials
    come back with max = t (the shift), so lse = t + log sum_exp as for any other shift.
    With `weight_sum` (sum_v W_v) the statistics are computed too.
    """
    with_stats = weight_sum is not None
    buffers.start_block(x, r0, r1)
    xb, targets = x.block(r0, r1, buffers.rows), x.targets[r0:r1]
    # x_i . W[y_i], multiplied in place in a free accumulator (vecdot would allocate the product)
    target_logit = gather_rows(weight, targets, buffers.parts[0].acc).mul_(xb).sum(1).mul_(factor)
    neg_shift = -target_logit[:, None]

    record = buffers.kept is not None

    def part_sums(part: Part):
        sum_exp = torch.zeros_like(target_logit)
        stats = _ShiftedStats(targets) if with_stats else None
        slice_sums = []
        for v0, v1 in part.slices:
            w = weight[v0:v1].to(x.dtype)
            shifted = torch.addmm(neg_shift, xb, w.T, alpha=factor, out=part.tile_for(r1 - r0, v0, v1))
            if stats is not None:
                stats.add_shifted_logits(shifted, v0)
            probs = shifted.exp_()
            tile_sum = probs.sum(1)
            sum_exp += tile_sum
            if record:
                slice_sums.append(tile_sum)
            if stats is not None:
                stats.add_probs(probs)
            part.done(v0, v1, probs)
        return sum_exp, stats, slice_sums

    results = Workers.map(part_sums, buffers.parts)
    sum_exp = _sum_in_order([s for s, _, _ in results])
    if record:  # a slice's mass is its share of the row's sum (the same shift for both)
        _plan_block(torch.stack([t for _, _, sums in results for t in sums]) / sum_exp, targets, buffers)
    partials = VocabPartials(max=target_logit, sum_exp=sum_exp, target_logit=target_logit)
    if not with_stats:
        return partials
    z_sum = torch.mv(xb, weight_sum).mul_(factor)
    return _ShiftedStats.combine([stats for _, stats, _ in results], partials, z_sum)


def _sum_in_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


class _ShiftedStats:
    """Statistics of one part's tiles of d = z - t (the shifted logits), beside the shifted lse.

    With p = exp(d): sum p d and sum p^2 give the entropy and log sum p^2 (both shift-invariant), and
    the largest d overall and before the target column give top-1 against d at the target as the tile
    itself computed it (t itself comes from another summation order). The mean logit comes from the
    block's rows times sum_v W_v (see _shifted_block).
    """

    def __init__(self, targets: torch.Tensor):
        self.targets = targets
        self.p_d = self.sq = self.d_target = self.d_max = self.d_max_before = None
        self._shifted = None

    def add_shifted_logits(self, d: torch.Tensor, col_start: int) -> None:
        local = self.targets - col_start
        in_tile = (local >= 0) & (local < d.shape[1])
        at_target = d.gather(1, local.clamp(0, d.shape[1] - 1)[:, None]).squeeze(1)
        cols = torch.arange(col_start, col_start + d.shape[1], device=d.device)
        before = d.masked_fill(cols[None, :] >= self.targets[:, None], float("-inf")).amax(1)
        self._accumulate(d_target=torch.where(in_tile, at_target, torch.zeros_like(at_target)))
        self.d_max = d.amax(1) if self.d_max is None else torch.maximum(self.d_max, d.amax(1))
        self.d_max_before = before if self.d_max_before is None else torch.maximum(self.d_max_before, before)
        self._shifted = d.clone()  # the tile is exponentiated in place next

    def add_probs(self, p: torch.Tensor) -> None:
        self._accumulate(p_d=(p * self._shifted).sum(1), sq=(p * p).sum(1))
        self._shifted = None

    def _accumulate(self, **sums: torch.Tensor) -> None:
        for name, value in sums.items():
            current = getattr(self, name)
            setattr(self, name, value if current is None else current + value)

    @staticmethod
    def combine(parts: list["_ShiftedStats"], partials: VocabPartials, z_sum: torch.Tensor) -> VocabPartials:
        t, sum_exp = partials.target_logit, partials.sum_exp
        p_d = _sum_in_order([s.p_d for s in parts])
        d_target = _sum_in_order([s.d_target for s in parts])  # one part holds the target, the others add 0
        d_max = torch.stack([s.d_max for s in parts]).amax(0)
        d_max_before = torch.stack([s.d_max_before for s in parts]).amax(0)
        return partials._replace(
            z_sum_exp=p_d + t * sum_exp,  # sum p z with z = d + t
            sq_sum_exp=_sum_in_order([s.sq for s in parts]),
            z_sum=z_sum,
            max_before_target=d_max_before + t,
            is_top1=(d_target >= d_max) & (d_target > d_max_before),
        )


def _online_forward(x: Rows, weight, bias, transform: Transform, with_stats: bool,
                    buffers: BlockBuffers) -> VocabPartials:
    return _cat([_online_block(x, r0, r1, weight, bias, transform, with_stats, buffers)
                 for r0, r1 in token_blocks(len(x))])


def _online_block(x: Rows, r0, r1, weight, bias, transform: Transform, with_stats: bool,
                  buffers: BlockBuffers) -> VocabPartials:
    buffers.start_block(x, r0, r1)
    xb, targets = x.block(r0, r1, buffers.rows), x.targets[r0:r1]

    record = buffers.kept is not None

    def part_partials(part: Part):
        running, tile_lse = None, []
        for v0, v1 in part.slices:
            w, b = _weight_slice(weight, bias, v0, v1, x.dtype)
            z = _logits(xb, w, b, transform, out=part.tile_for(r1 - r0, v0, v1))
            tile = _tile_partials(z, targets, v0, with_stats)
            part.done(v0, v1, z)
            if record:
                tile_lse.append(logsumexp(tile))
            running = tile if running is None else merge(_stack([running, tile]))
        return running, tile_lse

    results = Workers.map(part_partials, buffers.parts)
    parts = [partials for partials, _ in results]
    block = parts[0] if len(parts) == 1 else merge(_stack(parts))
    if record:
        tile_lse = torch.stack([t for _, lses in results for t in lses])
        _plan_block(torch.exp(tile_lse - logsumexp(block)), targets, buffers)
    return block


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


# --- backward ------------------------------------------------------------------------------------


@Workers.serial_caller()
def backward(x: Rows, weight, bias, lse, grad, transform: Transform, *, dx, dw, db,
             buffers: BlockBuffers | None = None, kept: list[list[bool]] | None = None):
    """Accumulate into dx ([N, H], indexed by x.rows), dw ([V, H]) and db ([V]); each may be None.

    All three are in the accumulation dtype and zero-initialised by the caller.
    `kept` (the forward's plan under a gradient tolerance, see kept_slices) lists per token block the
    slices to compute; None computes all. The parts of a block write disjoint rows of dw and db, and
    their shares of the block's dx are added in a fixed order.
    """
    factored = transform.is_linear and bias is None
    buffers = buffers or BlockBuffers(x, weight.shape[0])
    for index, (r0, r1) in enumerate(token_blocks(len(x))):
        xb, targets = x.block(r0, r1, buffers.rows), x.targets[r0:r1]
        block = _BackwardBlock(xb, targets, weight, bias, lse[r0:r1], grad[r0:r1], transform, dx is not None, dw,
                               db, None if kept is None else kept[index])
        shares = Workers.map(block.factored_part if factored else block.tiled_part, buffers.parts)
        dx_block = _sum_in_order(shares) if dx is not None else None
        if factored:
            dx_block = block.add_onehot_terms(dx_block, buffers.rows)
        if dx is not None:
            dx.index_copy_(0, x.rows[r0:r1], dx_block)


def _plan_block(mass: torch.Tensor, targets: torch.Tensor, buffers: BlockBuffers) -> None:
    """Which slices this block's backward computes, from their masses [slices, rows of the block]."""
    holds_target = target_tiles(targets, 1, mass.shape[0], max(1, targets.numel()), buffers.slice_width)
    buffers.kept.append(keep_within_budget(mass[None], holds_target, buffers.tolerance)[0].tolist())


def kept_slices(plan: torch.Tensor, n_rows: int, n_slices: int) -> list[list[bool]] | None:
    """The forward's plan (bool [>= token blocks, >= slices], see fastdpo.torch_head) as one list of kept
    slices per token block; None (compute everything) for an empty plan."""
    if plan.numel() == 0:
        return None
    return plan[: len(token_blocks(n_rows)), :n_slices].tolist()


class _BackwardBlock:
    def __init__(self, xb, targets, weight, bias, lse, grad, transform: Transform, need_dx, dw, db,
                 kept: list[bool] | None = None):
        self.xb, self.targets, self.weight, self.bias = xb, targets, weight, bias
        self.lse, self.grad, self.transform = lse, grad, transform
        self.need_dx, self.dw, self.db = need_dx, dw, db
        self.scaled_grad = transform.linear_factor * grad
        self.kept = kept

    def slices(self, part: Part):
        """The part's slices that the plan keeps (all without a tolerance)."""
        if self.kept is None:
            return part.slices
        return [s for k, s in enumerate(part.slices, part.first) if self.kept[k]]

    def factored_part(self, part: Part):
        """The backward of a linear head with the per-token scalar g_i pulled out of every tile.

        dz = g (onehot - P) with P = exp(c X W^T - lse), so
            dX = c g (W[y] - P W),      dW = -(c g P)^T X + scatter_y(c g X),
        and the onehot term never touches a tile (see add_onehot_terms): each tile costs one GEMM with
        the lse shift fused in, one in-place exp, one row scaling, and the GEMMs of the products.
        Returns this part's share of E[W] = sum_v P[i, v] W[v] (None without dx).
        """
        xb, factor = self.xb, self.transform.linear_factor
        neg_lse, neg_scaled_grad = -self.lse[:, None], -self.scaled_grad[:, None]
        share = part.acc[: xb.shape[0]].zero_() if self.need_dx else None
        for v0, v1 in self.slices(part):
            w = self.weight[v0:v1].to(xb.dtype)
            probs = torch.addmm(neg_lse, xb, w.T, alpha=factor, out=part.tile_for(xb.shape[0], v0, v1)).exp_()
            if share is not None:
                share.addmm_(probs, w)
            if self.dw is not None:
                # Scaling the tile's rows costs O(block x slice), against O(block x slice x H) for its
                # GEMMs, and saves a [block, H] copy of -c g X.
                self.dw[v0:v1].addmm_(probs.mul_(neg_scaled_grad).T, xb)
        return share

    def add_onehot_terms(self, expected_w, free_rows: torch.Tensor):
        """After every part: c g_i x_i into dW row y_i, and dx = c g (W[y] - E[W]). Consumes xb."""
        if self.dw is not None:  # xb is the block's own buffer: scaled in place
            self.dw.index_add_(0, self.targets, self.xb.mul_(self.scaled_grad[:, None]))
        if expected_w is None:
            return None
        return expected_w.sub_(gather_rows(self.weight, self.targets, free_rows)).mul_(-self.scaled_grad[:, None])

    def tiled_part(self, part: Part):
        xb = self.xb
        share = part.acc[: xb.shape[0]].zero_() if self.need_dx else None
        for v0, v1 in self.slices(part):
            w, b = _weight_slice(self.weight, self.bias, v0, v1, xb.dtype)
            z = _logits(xb, w, b, self.transform, out=part.tile_for(xb.shape[0], v0, v1))
            d_z = _logits_gradient(z, self.targets - v0, self.lse, self.grad)
            add_tile_gradients(self.transform.scale_gradient_(d_z, z), w, xb, share, self.dw, self.db, v0, v1)
        return share


def add_tile_gradients(d_raw, w, x, dx_share, dw, db, v0: int, v1: int, overwrite_dw: bool = False) -> None:
    """A d_logits tile [rows, v1 - v0] into its worker's dX share (d_raw W), dW[v0:v1] (d_rawᵀ X; written rather
    than added to with overwrite_dw) and db[v0:v1]; None where not needed. Parts own disjoint vocabulary rows, so
    dW and db need no lock."""
    if dx_share is not None:
        dx_share.addmm_(d_raw, w)
    if dw is not None and overwrite_dw:
        torch.mm(d_raw.T, x, out=dw[v0:v1])
    elif dw is not None:
        dw[v0:v1].addmm_(d_raw.T, x)
    if db is not None:
        db[v0:v1] += d_raw.sum(0)


def _logits_gradient(z, local_targets, lse, grad):
    """g * (onehot - softmax), built in one new tile."""
    probs = torch.sub(z, lse[:, None]).exp_()
    in_tile = (local_targets >= 0) & (local_targets < z.shape[1])
    d_z = probs.mul_(-grad[:, None])
    rows = in_tile.nonzero().squeeze(1)
    d_z[rows, local_targets[rows]] += grad[rows]
    return d_z
