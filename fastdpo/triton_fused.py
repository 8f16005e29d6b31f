"""The fused route's compute on the Triton backend: the forward's logits kept in a workspace slot.

The counterpart of fastdpo.torch_fused.StoredLogits, with the same interface, so fastdpo.fused_pass
drives either backend; FrozenStoredLogits (below) is the counterpart of torch_fused.FrozenAccumulator.
With n scored tokens and P = n·H·V, 3 passes (6P FLOPs; the two-pass route 8P):

    pass 1  forward(k): kernels/logprob_forward.py with STORE_LOGITS over token block k (the rows of one
            grouped launch: BLOCK_M x GROUP_M of config.gemm_config) writes the two-pass route's
            per-(tile, row) partials, so the log-probs are its bits, and also z (fp32, after the
            transform) into a slot of block_rows x V, and the target-free sums for 1 - p_y.
    once the loss has given g for all of the block's rows (fastdpo.fused_pass):
            kernels/stored_logits.py: D = g (onehot - exp(z - lse)) transform'(z) in the input dtype,
            the target entry g (1 - p_y) t'_y with 1 - p_y = sum_{v != y} p_v (as the torch route does)
    pass 2  dX rows = D W             cuBLAS, fp32 output (triton_head.accumulate_product)
    pass 3  dW += D^T X, db += colsum(D)    into fp32 accumulators for 16-bit weights (the torch route's
            rule: one rounding to the weight's dtype at the end); for fp32 weights they are the gradients.

D goes to a buffer of its own in the input dtype ([block_rows, V], allocated once) for 16-bit inputs; for
fp32 inputs it overwrites the slot in place. No atomics: every output element has one writer, dX rows
are written once, dW sums the blocks in schedule order, so runs repeat bitwise.

Cost at Llama-3-8B (n = 16,384 scored tokens, H = 4096, V = 128,256, bf16; block_rows = 128 x 8 = 1,024):
    FLOPs   3 x 2nHV = 51.6 TFLOP (65 ms at 793 TFLOP/s), against 68.9 TFLOP for the two-pass route.
    slot    block_rows x V x 4 B = 525 MB (501 MiB); the pair schedule holds a few at once (3-4 for
            pairs of ~600 + 600 scored tokens), within default_workspace_bytes (4 GiB on an H200).
    D       block_rows x V x 2 B = 263 MB, one buffer.
    bytes   stored z: written 8.4 GB (n V x 4 B), read once 8.4 GB; D written 4.2 GB and read by the two
            GEMMs 8.4 GB: 29.4 GB beyond the GEMMs' own operands (~6 ms at 4.8 TB/s), against the
            two-pass backward's 12.6 GB of d_logits traffic and its 17.2 TFLOP recompute.
            dW: the fp32 accumulator [V, H] (2.1 GB) is read and written by each of the n / block_rows
            = 16 dW GEMMs: 67 GB (~14 ms at 4.8 TB/s). This, not the FLOPs, is the route's largest
            overhead; larger blocks halve it per doubling (at twice the slot), a bf16 accumulator
            halves it at ~sqrt(k) 2^-9 relative error (fastdpo.fused_pass's docstring).
    memory  slots (rows padded to 16 bytes for the forward's TMA store of z) + each live block's X rows
            (block_rows x H, gathered once for its forward and its dW) + D + dW fp32 (2.1 GB for a bf16
            weight; none extra for fp32) + dX fp32 [N, H].

Frozen head (FrozenStoredLogits; fastdpo.fused_pass's frozen route, FastDPOLoss and linear_logprobs alike):
2 passes (4P FLOPs; the two-pass route 6P), U_i = dlogp_i/dh_i formed in the forward, g ⊙ U in the backward.
Each token block, in order, through one slot:

    pass 1  forward(k) as above; the block's lse is known once it ends (all the vocabulary tiles of its
            rows), so nothing is rescaled later
            kernels/stored_logits.py with g = 1: D = (onehot - p) transform'(z), the exact target entry
            (1 - p_y) t'_y, in the input dtype
    pass 2  U rows = D W              torch.mm: cuBLAS, fp32 output (triton_head.accumulate_product)

No loss is needed in the forward (any upstream loss: the backward's g_i scales row i of U), so there is
no pair schedule: one slot, freed after each block. U is written once per row: runs repeat bitwise.

Cost at Llama-3-8B (as above):
    FLOPs   2 x 2nHV = 34.4 TFLOP (43 ms at 793 TFLOP/s), against 51.6 TFLOP for the two-pass route.
    memory  during the forward one slot (525 MB) and D (263 MB; none for fp32 inputs: the slot is D);
            U fp32 [n, H] (268 MB) from the forward to the backward.
    bytes   stored z written and read once (2 x 8.4 GB), D written and read once (2 x 4.2 GB): 25.2 GB
            beyond the GEMMs' operands (~5 ms at 4.8 TB/s), against the two-pass backward's 8.4 GB of
            d_logits traffic and its 17.2 TFLOP recompute (~22 ms).
"""

from __future__ import annotations

import torch

from .chunked import Rows
from .kernels.config import device_capability, gemm_config
from .softmax_stats import VocabPartials, logsumexp, merge
from .torch_head import zero_gradients
from .transform import LogitTransform
from .triton_head import accumulate_product, row_major

# The fused route's workspace bound on a GPU when the caller gives none: 1/32 of the device's memory, at
# most 4 GiB (8 slots of 1,024 rows at V = 128,256). Total, not free, memory: the bound decides the route,
# and the same inputs must take the same route.
# By the two-pass workspace's arithmetic (kernels/config.py, MIN_CHUNK_GEMM_OUTPUT): a slot is one grouped
# launch of block_rows = BLOCK_M x GROUP_M = 1,024 rows, and its GEMMs (dX [1024, H] with K = V, dW [V, H]
# with K = 1024) write 2^22 and V x H >= 2^28 elements: the slot's size is already set by the forward's
# launch, not by GEMM efficiency, and the bound only caps how many slots the pair schedule may hold. It
# allocates what the schedule needs (slots x block_rows x V x 4 B: 501 MiB per slot at V = 128,256; 2-4 slots
# for pairs of a few hundred to ~1,000 scored tokens per sequence), never the bound itself; a smaller bound
# would send long pairs to the two-pass path, which needs less memory but a fourth GEMM pass. So the bound
# stays. What the route costs beside the gradients (README, "Memory"): the slots, D [block_rows, V] in the
# input dtype, the fp32 dW [V, H] (twice a bf16 gradient) and dX [N, H] accumulators, and the per-block
# forward tables until the end: about 4x the two-pass route's memory at Llama-3-8B 16k (3 slots), for 3
# passes instead of 4. fused=False is the smallest-memory setting.
MAX_DEFAULT_WORKSPACE = 4 << 30


def default_workspace_bytes(device: torch.device, cpu_default: int) -> int:
    if device.type != "cuda":
        return cpu_default
    return min(MAX_DEFAULT_WORKSPACE, torch.cuda.get_device_properties(device).total_memory // 32)


class StoredLogits:
    """The trainable route's workspace and gradient accumulators for the scored rows `x`, on Triton.

    forward(k) computes token block k into a free slot; backward_rows(k, a, b, grad) turns rows [a, b) of
    block k into d_logits and adds their dX, dW and db; release(k) frees the block's slot.
    """

    def __init__(self, x: Rows, weight, bias, transform: LogitTransform, with_stats: bool, n_slots: int, *,
                 need_dx: bool, need_dw: bool, need_db: bool):
        self.hidden, self.weight = row_major(x.hidden), row_major(weight)
        self.x, self.bias, self.transform, self.with_stats = x, bias, transform, with_stats
        vocab_size, device = weight.shape[0], weight.device
        rows = self.block_rows(x)
        self.blocks = [(r0, min(r0 + rows, len(x))) for r0 in range(0, len(x), rows)]
        # Rows padded to 16 bytes: the persistent forward stores z through a tensor descriptor (TMA).
        self.slots = torch.empty(n_slots, min(rows, len(x)), padded_vocab(vocab_size), dtype=torch.float32,
                                 device=device)[:, :, :vocab_size]
        # fp32 inputs: D overwrites the slot; 16-bit: a buffer of its own (the GEMMs take the input dtype).
        self.d_logits = None if weight.dtype == torch.float32 else torch.empty(
            self.slots.shape[1:], dtype=weight.dtype, device=device)
        self.free, self.slot_of = list(range(n_slots - 1, -1, -1)), {}
        self.partials, self.tables, self.gap, self.x_scored = {}, {}, {}, {}
        self.dx, self.dw, self.db = zero_gradients(x.hidden, weight, torch.float32, need_dx, need_dw,
                                                   need_db and bias is not None)

    @staticmethod
    def block_rows(x: Rows) -> int:
        """Rows per token block: one grouped launch of the forward (BLOCK_M x GROUP_M), so W is read from
        HBM once per block, as in the two-pass forward."""
        cfg = gemm_config(x.hidden.dtype, device_capability(x.hidden.device), x.hidden.shape[1])
        return cfg["BLOCK_M"] * cfg["GROUP_M"]

    @classmethod
    def slot_bytes(cls, x: Rows, vocab_size: int) -> int:
        return max(1, min(cls.block_rows(x), len(x))) * padded_vocab(vocab_size) * 4

    def forward(self, k: int) -> VocabPartials:
        """Block k's merged partials (the two-pass route's per-tile bits), its z kept in a slot."""
        from .kernels.logprob_forward import logprob_forward

        self.slot_of[k] = self.free.pop()
        r0, r1 = self.blocks[k]
        # The block's scored rows, gathered once: the persistent forward's operand and the dW GEMM's.
        self.x_scored[k] = self.hidden.index_select(0, self.x.rows[r0:r1])
        table, target_logit, excl = logprob_forward(
            self.hidden, self.weight, self.bias, self.x.rows[r0:r1], self.x.targets[r0:r1],
            transform=self.transform, with_stats=self.with_stats, slot=self.slots[self.slot_of[k]],
            x_scored=self.x_scored[k])
        self.tables[k] = (table, target_logit)
        partials = merge(VocabPartials(table[0], table[1], target_logit[None], *table[2:]))
        self.partials[k] = partials
        # 1 - p_y = sum_j e_j exp(m_j - lse), tile by tile in a fixed order (torch's reduction over dim 0).
        self.gap[k] = (excl * torch.exp(table[0] - logsumexp(partials))).sum(0)
        return partials

    def merged_partials(self) -> VocabPartials:
        """Every block's partials, merged as the two-pass route merges its one table: the same bits."""
        order = range(len(self.blocks))
        table = torch.cat([self.tables[k][0] for k in order], dim=2)
        target_logit = torch.cat([self.tables[k][1] for k in order])
        return merge(VocabPartials(table[0], table[1], target_logit[None], *table[2:]))

    def complete(self) -> None:
        """Nothing is queued here: backward_rows computes its rows at once (torch_fused.StoredLogits queues them)."""

    def release(self, k: int) -> None:
        self.free.append(self.slot_of.pop(k))
        del self.x_scored[k]

    def d_logits_rows(self, k: int, a: int, b: int, grad: torch.Tensor) -> torch.Tensor:
        """D of rows [a, b) of block k (kernels/stored_logits.py; grad: their dloss/dlogp), in the input dtype:
        the slot itself for fp32 inputs, else the D buffer."""
        from .kernels.stored_logits import stored_logits_grad

        r0 = self.blocks[k][0]
        slot = self.slots[self.slot_of[k]][a:b]
        d = slot if self.d_logits is None else self.d_logits[: b - a]
        lse = logsumexp(self.partials[k])[a:b]
        stored_logits_grad(slot, d, self.x.targets[r0 + a: r0 + b], lse, grad.float().contiguous(),
                           self.gap[k][a:b].contiguous(), transform=self.transform)
        return d

    def backward_rows(self, k: int, a: int, b: int, grad: torch.Tensor) -> None:
        """d_logits of rows [a, b) of block k (grad: their dloss/dlogp), then their dX, dW and db."""
        d = self.d_logits_rows(k, a, b, grad)
        r0 = self.blocks[k][0]
        rows = self.x.rows[r0 + a: r0 + b]
        if self.dx is not None:
            dx_rows = torch.zeros((b - a, self.dx.shape[1]), dtype=torch.float32, device=d.device)
            accumulate_product(dx_rows, d, self.weight)
            self.dx.index_copy_(0, rows, dx_rows)
        if self.dw is not None:
            accumulate_product(self.dw, d.T, self.x_scored[k][a:b])
        if self.db is not None:
            self.db += d.sum(0, dtype=torch.float32)


class FrozenStoredLogits(StoredLogits):
    """The frozen route's forward on Triton (module docstring, "Frozen head"): one slot, reused block by block.

    Each block's D with g = 1 is formed as soon as its forward is done (its lse is then known: all the
    vocabulary tiles of its rows), and U = D W; the backward scales U by g (fastdpo.fused_pass).
    """

    def __init__(self, x: Rows, weight, bias, transform: LogitTransform, with_stats: bool):
        super().__init__(x, weight, bias, transform, with_stats, 1, need_dx=False, need_dw=False, need_db=False)

    def forward_with_u(self) -> tuple[VocabPartials, torch.Tensor]:
        """(every block's merged partials: the two-pass route's bits, U fp32 [rows, H]: dlogp_i/dh_i)."""
        u = torch.zeros(len(self.x), self.hidden.shape[1], dtype=torch.float32, device=self.hidden.device)
        ones = torch.ones(self.slots.shape[1], dtype=torch.float32, device=u.device)
        for k, (r0, r1) in enumerate(self.blocks):
            self.forward(k)
            accumulate_product(u[r0:r1], self.d_logits_rows(k, 0, r1 - r0, ones[: r1 - r0]), self.weight)
            self.release(k)
        return self.merged_partials(), u


def padded_vocab(vocab_size: int) -> int:
    """A slot row's length: the vocabulary rounded up to 16 bytes of fp32."""
    return -(-vocab_size // 4) * 4
