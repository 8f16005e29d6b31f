"""The fused route's compute on the Triton backend: the forward's tiles kept in a ring of workspace slots.

The counterpart of fastdpo.torch_fused.StoredLogits, with the same interface, so fastdpo.fused_pass
drives either backend; FrozenStoredLogits (below) is the counterpart of torch_fused.FrozenAccumulator.
With n scored tokens and P = n·H·V, 3 passes (6P FLOPs; the two-pass route 8P). The rows come pair by
pair (fused_pass.PairMajorSchedule), in token blocks of 2 x BLOCK_M = 256 rows, computed in order:

    pass 1  forward(k): kernels/logprob_forward.py with STORE_LOGITS over token block k writes the
            two-pass route's per-(tile, row) partials, so the log-probs are its bits, the target-free
            sums for 1 - p_y, and the tiles in exp space, e = exp(z - m) with m the row's maximum over
            the 128-column tile, into the block's slot in the input dtype (e in (0, 1]: bf16 keeps p to
            2^-9 relative, where z itself would need fp32).
    once the loss has given g for all of the block's rows (fastdpo.fused_pass):
            kernels/stored_logits.py: D = g (onehot - e exp(m - lse)) transform'(z) in the input dtype,
            in place of e; the target entry g (1 - p_y) t'_y with 1 - p_y = sum_{v != y} p_v
    the blocks released together (consecutive: one run of the ring, two where it wraps), one GEMM each:
    pass 2  dX rows = D W             cuBLAS, written once in the hidden states' dtype (fp32 inside)
    pass 3  dW += D^T X, db += colsum(D)    cuBLAS; dW's accumulator is the gradient itself (fp32
            weights; 16-bit ones while the schedule runs at most MAX_ROUNDED_DW_GEMMS dW GEMMs, each
            rounding once), else fp32 cast once at the end.

No atomics: every output element has one writer, dX rows are written once, dW sums the runs in schedule
order, so runs repeat bitwise.

Cost at Llama-3-8B (H = 4096, V = 128,256, bf16; n = 10,169 scored tokens of 16 sequences of 1,024,
pairs of ~1,200 scored tokens: the side-by-side benchmark's 16k case):
    FLOPs   3 x 2nHV = 32.0 TFLOP (40 ms at 793 TFLOP/s), against 42.7 TFLOP for the two-pass route.
    ring    7 slots of 256 x V x 2 B (438 MiB): a pair's blocks are held from its first to its last
            (fused_pass.PairMajorSchedule), within the fused workspace bound (default_workspace_bytes).
    bytes   e written and read once (2 x 2.6 GB), D written in place (2.6 GB) and read by the two GEMMs
            (5.2 GB): 13 GB beyond the GEMMs' operands (~3 ms at 4.8 TB/s), against the two-pass
            backward's d_logits traffic (7.8 GB) and its recompute (10.7 TFLOP). The forward reads W
            once per 256-row block, 40 x 1.05 GB (~9 ms at 4.8 TB/s, beneath the forward's 13 ms of
            MMAs: 256 FLOP a byte, above an H200's ~150 and an H100's ~240); each of the 11 dW GEMMs
            reads and writes the bf16 dW (23 GB, ~5 ms), each dX GEMM reads W (11 GB).
    memory  the ring + dW in the weight's dtype (1,002 MiB, the gradient) + dX [N, H] (128 MiB) + the
            held blocks' tables (merged block by block: kernels/partials_merge.py folds each row alone, so
            a block's rows get the bits of all rows merged at once) + a run's X rows and dX product:
            1,611 MiB above the inputs (README, "Memory").

Frozen head (FrozenStoredLogits; fastdpo.fused_pass's frozen route, FastDPOLoss and linear_logprobs alike):
2 passes (4P FLOPs; the two-pass route 6P), U_i = dlogp_i/dh_i formed in the forward, g ⊙ U in the backward.
The token blocks, in order, in groups of FROZEN_SLOTS through the ring:

    pass 1  forward(k) as above; the block's lse is known once it ends (all the vocabulary tiles of its
            rows), so nothing is rescaled later
            kernels/stored_logits.py with g = 1: D = (onehot - p) transform'(z), the exact target entry
            (1 - p_y) t'_y, in the input dtype, in place
    pass 2  U rows = D W              one GEMM a group (1,024 rows): cuBLAS, fp32 output
                                      (triton_head.accumulate_product)

No loss is needed in the forward (any upstream loss: the backward's g_i scales row i of U), so there is
no pair schedule: FROZEN_SLOTS slots, reused group by group. U is written once per row: runs repeat bitwise.

Cost at Llama-3-8B (as above):
    FLOPs   2 x 2nHV = 21.4 TFLOP (27 ms at 793 TFLOP/s), against 32.0 TFLOP for the two-pass route.
    memory  during the forward 4 slots (251 MiB); U fp32 [n, H] (159 MiB) from the forward to the backward.
    bytes   e written and read once, D written and read once (4 x 2.6 GB): 10.4 GB beyond the GEMMs'
            operands (~2 ms at 4.8 TB/s), against the two-pass backward's d_logits traffic and its
            10.7 TFLOP recompute (~13 ms).
"""

from __future__ import annotations

import torch

from .chunked import Rows, _cat
from .kernels.config import device_capability, gemm_config
from .softmax_stats import VocabPartials, logsumexp
from .transform import LogitTransform
from .triton_head import accumulate_product, merged_table, row_major

# The fused route's workspace bound on a GPU when the caller gives none: 1/32 of the device's memory, at
# most 4 GiB. Total, not free, memory: the bound decides the route, and the same inputs must take the same
# route. It caps the ring the pair schedule needs (slots x 256 rows x V in the input dtype: 63 MiB a slot at
# V = 128,256 in bf16; ~7 slots for pairs of ~1,200 scored tokens, 64 slots, a pair of ~16k, at 4 GiB), and
# allocates what the schedule needs, never the bound itself; a longer pair takes the two-pass path, which
# needs less memory but a fourth GEMM pass. What the route costs beside the gradients: the ring, the blocks'
# held blocks' tables and, past MAX_ROUNDED_DW_GEMMS dW GEMMs, an fp32 dW for a 16-bit weight (README, "Memory").
MAX_DEFAULT_WORKSPACE = 4 << 30


def default_workspace_bytes(device: torch.device, cpu_default: int) -> int:
    if device.type != "cuda":
        return cpu_default
    return min(MAX_DEFAULT_WORKSPACE, torch.cuda.get_device_properties(device).total_memory // 32)


class StoredLogits:
    """The trainable route's workspace and gradients for the scored rows `x`, on Triton (module docstring).

    forward(k) computes token block k into its slot of the ring; backward_rows(k, a, b, grad) turns rows [a, b)
    of block k into d_logits in place; release(k) queues the block for the dX, dW and db GEMMs, which run over
    the consecutive blocks released together before the next forward reuses a slot (and at complete()).
    `schedule` (fused_pass.PairMajorSchedule) computes the blocks in order and releases them in order.
    """

    def __init__(self, x: Rows, weight, bias, transform: LogitTransform, with_stats: bool, n_slots: int, *,
                 need_dx: bool, need_dw: bool, need_db: bool, schedule=None):
        self.hidden, self.weight = row_major(x.hidden), row_major(weight)
        self.x, self.bias, self.transform, self.with_stats = x, bias, transform, with_stats
        vocab_size, device = weight.shape[0], weight.device
        self.rows_per_slot = self.slot_rows(x)
        self.blocks = [(r0, min(r0 + self.rows_per_slot, len(x))) for r0 in range(0, len(x), self.rows_per_slot)]
        # Block k lives in slot k mod n_slots: the schedule holds at most n_slots consecutive blocks at once.
        # Rows padded to 16 bytes: the persistent forward stores through a tensor descriptor (TMA).
        self.n_slots = n_slots
        self.ring = torch.empty(n_slots * self.rows_per_slot, padded_vocab(vocab_size, x.hidden.dtype),
                                dtype=x.hidden.dtype, device=device)[:, :vocab_size]
        self.local, self.partials, self.gap, self.tile_max, self.queued = {}, {}, {}, {}, []
        # x's rows as indices into the caller's, and its inverse (a vocab-parallel shard merges in the caller's order)
        self.order, self.caller_order = (None, None) if schedule is None else (schedule.order, schedule.caller_order)
        self.dx = torch.zeros(x.hidden.shape, dtype=self.dx_dtype(x.hidden), device=device) if need_dx else None
        self.dw = torch.zeros(weight.shape, dtype=dw_accumulator_dtype(weight.dtype, schedule, n_slots),
                              device=device) if need_dw else None
        self.db = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_db and bias is not None else None

    @staticmethod
    def dx_dtype(hidden: torch.Tensor) -> torch.dtype:
        """dX rows are written once each, by one GEMM with fp32 accumulation: in the hidden states' dtype."""
        return hidden.dtype

    @staticmethod
    def block_rows(x: Rows) -> int:
        """Rows per token block: two BLOCK_M token tiles. The slots hold a pair's blocks, so their rows set the
        route's memory; fewer rows per launch read W from HBM more often (2 B H V FLOPs per V H e bytes, B FLOP
        a byte for bf16), and 256 keeps that above the ridge of an H100 (~240) and an H200 (~150)."""
        return 2 * gemm_config(x.hidden.dtype, device_capability(x.hidden.device), x.hidden.shape[1])["BLOCK_M"]

    @classmethod
    def slot_rows(cls, x: Rows) -> int:
        """A slot's rows: a token block's, or all of x's where fewer."""
        return max(1, min(cls.block_rows(x), len(x)))

    @classmethod
    def slot_bytes(cls, x: Rows, vocab_size: int) -> int:
        return cls.slot_rows(x) * padded_vocab(vocab_size, x.hidden.dtype) * x.hidden.itemsize

    def ring_rows(self, first: int, last: int) -> torch.Tensor:
        """The ring's rows of blocks first..last, consecutive slots (a run that does not wrap)."""
        r0, r1 = self.blocks[first][0], self.blocks[last][1]
        start = (first % self.n_slots) * self.rows_per_slot
        return self.ring[start: start + r1 - r0]

    def forward(self, k: int) -> VocabPartials:
        """Block k's merged partials (the two-pass route's bits: the merge is row by row), its tiles kept in exp
        space in a slot, each tile's maxima (the table's m) until its d_logits are formed."""
        from .kernels.logprob_forward import logprob_forward

        self._flush()  # the released blocks' GEMMs read their slots: before one is reused
        r0, r1 = self.blocks[k]
        table, target_logit, excl = logprob_forward(
            self.hidden, self.weight, self.bias, self.x.rows[r0:r1], self.x.targets[r0:r1],
            transform=self.transform, with_stats=self.with_stats, slot=self.ring_rows(k, k))
        partials, self.gap[k] = merged_table(table, target_logit, excl)
        self.local[k] = self.partials[k] = partials
        self.tile_max[k] = table[0]
        return partials

    def merged_partials(self) -> VocabPartials:
        """Every block's partials, in x's row order: the two-pass route's bits (the merge is row by row)."""
        self.complete()
        self.ring = None
        return _cat([self.local[k] for k in range(len(self.blocks))])

    def complete(self) -> None:
        """The queued blocks' GEMMs."""
        self._flush()

    def release(self, k: int) -> None:
        self.queued.append(k)

    def d_logits_rows(self, k: int, a: int, b: int, grad: torch.Tensor) -> torch.Tensor:
        """D of rows [a, b) of block k (kernels/stored_logits.py; grad: their dloss/dlogp), in the input dtype, in
        place of their stored tiles."""
        from .kernels.stored_logits import stored_logits_grad

        r0 = self.blocks[k][0]
        d = self.ring_rows(k, k)[a:b]
        lse = logsumexp(self.partials[k])[a:b]
        stored_logits_grad(d, d, self.tile_max[k][:, a:b], self.x.targets[r0 + a: r0 + b],
                           self.local[k].target_logit[a:b], lse,
                           grad.float().contiguous(), self.gap[k][a:b].contiguous(), tile_v=self.tile_v(),
                           transform=self.transform)
        return d

    def tile_v(self) -> int:
        """The forward's vocabulary tile: the width of each tile maximum in its table."""
        return gemm_config(self.hidden.dtype, device_capability(self.hidden.device), self.hidden.shape[1])["BLOCK_V"]

    def backward_rows(self, k: int, a: int, b: int, grad: torch.Tensor) -> None:
        """d_logits of rows [a, b) of block k (grad: their dloss/dlogp); their GEMMs run once the block is released."""
        self.d_logits_rows(k, a, b, grad)

    def _flush(self) -> None:
        """dX, dW and db of the released blocks: one GEMM each per run of consecutive slots (the ring wraps at
        most once), so the gradients take one rounding per run, not per block."""
        queued, self.queued = self.queued, []
        for run in _slot_runs(queued, self.n_slots):
            d = self.ring_rows(run[0], run[-1])
            rows = self.x.rows[self.blocks[run[0]][0]: self.blocks[run[-1]][1]]
            if self.dx is not None:
                self.dx.index_copy_(0, rows, _product(d, self.weight, self.dx.dtype))
            if self.dw is not None:
                accumulate_product(self.dw, d.T, self.hidden.index_select(0, rows))
            if self.db is not None:
                self.db += d.sum(0, dtype=torch.float32)
        for k in queued:
            del self.partials[k], self.gap[k], self.tile_max[k]


class FrozenStoredLogits(StoredLogits):
    """The frozen route's forward on Triton (module docstring, "Frozen head"): groups of FROZEN_SLOTS blocks
    through the ring, one U GEMM a group.

    Each block's D with g = 1 is formed as soon as its forward is done (its lse is then known: all the
    vocabulary tiles of its rows), and U = D W over the group's rows; the backward scales U by g
    (fastdpo.fused_pass).
    """

    def __init__(self, x: Rows, weight, bias, transform: LogitTransform, with_stats: bool):
        blocks = -(-len(x) // self.slot_rows(x))
        super().__init__(x, weight, bias, transform, with_stats, max(1, min(FROZEN_SLOTS, blocks)),
                         need_dx=False, need_dw=False, need_db=False)

    def forward_with_u(self) -> tuple[VocabPartials, torch.Tensor]:
        """(every block's merged partials: the two-pass route's bits, U fp32 [rows, H]: dlogp_i/dh_i)."""
        u = torch.zeros(len(self.x), self.hidden.shape[1], dtype=torch.float32, device=self.hidden.device)
        ones = torch.ones(self.rows_per_slot, dtype=torch.float32, device=u.device)
        for first in range(0, len(self.blocks), self.n_slots):  # a group starts at slot 0
            group = range(first, min(first + self.n_slots, len(self.blocks)))
            for k in group:
                self.forward(k)
                r0, r1 = self.blocks[k]
                self.d_logits_rows(k, 0, r1 - r0, ones[: r1 - r0])
                self.release(k)
            r0, r1 = self.blocks[group[0]][0], self.blocks[group[-1]][1]
            accumulate_product(u[r0:r1], self.ring_rows(group[0], group[-1]), self.weight)
        return self.merged_partials(), u


# Blocks per U GEMM on the frozen route: 4 x 256 = 1,024 rows, so U = D W writes [1024, H], 8 x 16 output tiles
# of 128 x 256 at H = 4096 (about one wave on 132 SMs), where one 256-row block would fill a quarter of one.
FROZEN_SLOTS = 4


# The most dW GEMMs a 16-bit weight's gradient takes as its own accumulator (one rounding each): relative error
# ~1.6e-3 sqrt(k / 2) against float64 (tools/dw_accumulation.py: 3.5e-3 at k = 8, 4.7e-3 at 16), so at most
# ~4.3e-3 at 12. More (many pairs: n / pair length GEMMs) take an fp32 accumulator, cast once at the end.
MAX_ROUNDED_DW_GEMMS = 12


def dw_accumulator_dtype(weight_dtype: torch.dtype, schedule, n_slots: int) -> torch.dtype:
    """dW's accumulator: the gradient itself (the weight's dtype) for fp32/fp64 weights and for 16-bit ones whose
    schedule runs at most MAX_ROUNDED_DW_GEMMS dW GEMMs; fp32 otherwise."""
    if weight_dtype.itemsize >= 4:
        return weight_dtype
    gemms = sum(len(_slot_runs(step.release, n_slots)) for step in schedule.steps)
    return weight_dtype if gemms <= MAX_ROUNDED_DW_GEMMS else torch.float32


def _slot_runs(blocks: list[int], n_slots: int) -> list[list[int]]:
    """blocks (ascending) cut where the next is not the next block or the ring wraps to slot 0."""
    runs = []
    for k in blocks:
        if runs and k == runs[-1][-1] + 1 and k % n_slots:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with fp32 accumulation, rounded once to `dtype`."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    accumulate_product(out, a, b)
    return out


def padded_vocab(vocab_size: int, dtype: torch.dtype) -> int:
    """A slot row's length: the vocabulary rounded up to 16 bytes of `dtype`."""
    per_16_bytes = 16 // dtype.itemsize
    return -(-vocab_size // per_16_bytes) * per_16_bytes
