"""Forward of the fused LM-head log-prob: a GEMM whose epilogue keeps softmax partials, not logits.

Each (token block, vocabulary tile), in grouped order (logits_tile.grouped_tile), by either driver of
logits_tile (one program per tile, or the persistent one with SUBTILES tiles per accumulator): it forms
z = transform(X W^T + b) for its BLOCK_M x BLOCK_V tile in registers and writes, per token row i and
vocabulary tile j, the tile's softmax partials into a table [fields, tiles, rows]:

    m_ij = max_{v in j} z_iv,   s_ij = sum_{v in j} exp(z_iv - m_ij)

and, when statistics are requested,
    a_ij = sum exp(z_iv - m_ij) z_iv        q_ij = sum exp(2 (z_iv - m_ij))
    u_ij = sum z_iv                          b_ij = max_{v in j, v < target_i} z_iv

The tile holding row i's target writes t_i = z_{i, target_i} to a [rows] vector (one writer per
element). fastdpo.softmax_stats.merge folds the table over the tile axis in a fixed order:
lse_i = M_i + log sum_j s_ij e^{m_ij - M_i} with M_i = max_j m_ij, and logp_i = t_i - lse_i.
No locks, no atomics: every element of the outputs has exactly one writer, so results are bitwise
reproducible, and the max/sum path is the same code whether or not statistics are compiled in.

STORE_LOGITS (the fused route, fastdpo.triton_fused) also writes the tile in exp space,
p_iv = exp(z_iv - m_ij) in (0, 1], into a workspace slot [rows, V] (row stride stride_slot) in the slot's
dtype (the input dtype: 2 bytes for bf16, where raw z would need fp32: bf16 keeps 2^-9 of p's relative
precision whatever the offset, but only 2^-9 of z's absolute value, 0.06 at z = 30) and, per (tile, row),
the target-free sum
e_ij = sum_{v in j, v != target_i} exp(z_iv - m_ij), from which 1 - p_y = sum_j e_ij e^{m_ij - lse_i}
without the cancellation of 1 - p_y when p_y -> 1. The partials above are computed by the same code,
so the log-probs are those of the launch without it.

Cost at the Llama-3-8B head (n = 16,384 scored tokens, H = 4096, V = 128,256, bf16; sm_90's persistent
driver: 128 x 256 x 64 GEMM tiles = two 128 x 128 epilogue tiles, GROUP_M = 8, 132 programs;
tools/cost_model.py computes the HBM terms from config.gemm_config):
    FLOPs  2 n V H = 17.2 TFLOP                                (21.5 ms at 800 TFLOP/s)
    HBM    W once per group of 8 token blocks: 16 x 1.05 GB = 16.8 GB; X gathered once into [n, H]
           (0.13 GB read, 0.13 GB written) and read once: 0.13 GB; table 2 x 4 x n x V/128 = 131 MB
           (6 fields with statistics: 394 MB)   (~5.7 ms at 3 TB/s, overlapped with the MMAs)
    L2->SM operands (BLOCK_M + BLOCK_N) H 2 B per GEMM tile: 2 n V H (1/128 + 1/256) B = 202 GB
           (269 GB with 128 x 128 tiles): the reason for 256-wide tiles, which read each W row once
           per 128 token rows and each X row once per 256 vocabulary rows
    tiles  128 x 501 = 64,128 GEMM tiles, 485 or 486 per program (the last round 82% full)
    The one exception (config.persistent_config): STORE_LOGITS + statistics + softcap runs 128 x 128
    GEMM tiles (269 GB), its epilogue spilling beside a second accumulator half otherwise.
    atomics 0
"""

import torch
import triton
import triton.language as tl

from .config import device_capability, gemm_config, persistent_config
from .logits_tile import (TensorDescriptor, column_halves, descriptor_arguments, descriptor_ready, finish_logits,
                          grouped_tile, persistent_launch, raw_tile, raw_tile_tma, tile_arguments, token_block)

STAT_FIELDS = 6  # m, s, a, q, u, b
PLAIN_FIELDS = 2  # m, s


@triton.jit
def forward_epilogue(
    acc, tile_v, first_row, offs_m, row_mask, targets, b_ptr, table_ptr, target_logit_ptr, slot_ptr, excl_ptr,
    n_rows, vocab_size, stride_slot, logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, STORE_LOGITS: tl.constexpr,
    SLOT_DESCRIPTOR: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Vocabulary tile tile_v of token block offs_m, from its raw product acc [BLOCK_M, BLOCK_V]: z,
    then the tile's partials, its target logits and (STORE_LOGITS) exp(z - m) and the target-free sums."""
    first_col = tile_v * BLOCK_V
    cols = first_col + tl.arange(0, BLOCK_V)
    z = finish_logits(acc, b_ptr, cols, cols < vocab_size, logit_scale, softcap, inv_temperature, HAS_BIAS,
                      HAS_SOFTCAP)
    # Columns compared by their offset in the tile against per-row or scalar bounds: the compares take
    # immediates, not a register per column and thread (128 x 256 tiles spill otherwise).
    lane = tl.arange(0, BLOCK_V)[None, :]
    local_target = (targets - first_col)[:, None]
    col_mask = lane < vocab_size - first_col
    z = tl.where(col_mask, z, float("-inf"))  # every tile has at least one real column
    in_tile = (targets >= first_col) & (targets < first_col + BLOCK_V)
    target_logit = tl.sum(tl.where(lane == local_target, z, 0.0), axis=1)
    tl.store(target_logit_ptr + offs_m, target_logit, mask=row_mask & in_tile)

    # int64 offsets: fields x tiles x rows passes 2^31 at a million scored tokens.
    n_tiles = tl.cdiv(vocab_size, BLOCK_V)
    field = n_tiles.to(tl.int64) * n_rows
    out = table_ptr + tile_v.to(tl.int64) * n_rows + offs_m
    if WITH_STATS:  # the statistics of z alone first: z and p are then never live beside them
        z_finite = tl.where(col_mask, z, 0.0)  # keeps 0 * -inf out of the sums
        tl.store(out + 4 * field, tl.sum(z_finite, axis=1), mask=row_mask)
        before = tl.where(lane < local_target, z, float("-inf"))
        tl.store(out + 5 * field, tl.max(before, axis=1), mask=row_mask)
    tile_max = tl.max(z, axis=1)
    p = tl.exp(z - tile_max[:, None])
    tl.store(out, tile_max, mask=row_mask)
    tl.store(out + field, tl.sum(p, axis=1), mask=row_mask)
    if STORE_LOGITS:
        excl = tl.sum(tl.where(lane == local_target, 0.0, p), axis=1)
        tl.store(excl_ptr + tile_v.to(tl.int64) * n_rows + offs_m, excl, mask=row_mask)
    if WITH_STATS:
        tl.store(out + 2 * field, tl.sum(p * tl.where(col_mask, z, 0.0), axis=1), mask=row_mask)
        tl.store(out + 3 * field, tl.sum(p * p, axis=1), mask=row_mask)
    # p last, once the statistics are done (stored beside them, its 16-bit copy spills): through a descriptor
    # (a TMA store from shared memory, no address per element, clipped at n and V) or through pointers.
    if STORE_LOGITS and SLOT_DESCRIPTOR:
        slot_ptr.store([first_row, first_col], p.to(slot_ptr.dtype))
    if STORE_LOGITS and not SLOT_DESCRIPTOR:
        slot = slot_ptr + offs_m.to(tl.int64)[:, None] * stride_slot + cols[None, :]
        tl.store(slot, p.to(slot_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask)


@triton.jit
def logprob_forward_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, table_ptr, target_logit_ptr, slot_ptr, excl_ptr,
    n_rows, vocab_size, hidden_size, stride_x, stride_w, stride_slot,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The pointer driver: one program per (token block, vocabulary tile), X rows gathered by index."""
    pid_m, pid_v = grouped_tile(tl.program_id(0), n_rows, vocab_size, BLOCK_M, BLOCK_V, GROUP_M)
    offs_m, row_mask, rows = token_block(rows_ptr, pid_m, n_rows, BLOCK_M)
    targets = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1).to(tl.int32)  # V < 2^31: half the registers
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = raw_tile(x_ptr, w_ptr, rows, row_mask, cols, cols < vocab_size, hidden_size, stride_x, stride_w,
                   BLOCK_M, BLOCK_V, BLOCK_K, INPUT_PRECISION)
    forward_epilogue(acc, pid_v, pid_m * BLOCK_M, offs_m, row_mask, targets, b_ptr, table_ptr, target_logit_ptr,
                     slot_ptr, excl_ptr, n_rows, vocab_size, stride_slot, logit_scale, softcap, inv_temperature,
                     HAS_BIAS, HAS_SOFTCAP, WITH_STATS, STORE_LOGITS, False, BLOCK_V)


@triton.jit
def logprob_forward_tma_kernel(
    x_desc, w_desc, b_ptr, targets_ptr, table_ptr, target_logit_ptr, slot_ptr, excl_ptr,
    n_rows, vocab_size, hidden_size, stride_slot,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLOT_DESCRIPTOR: tl.constexpr,
):
    """The persistent driver (config.persistent_config): NUM_SMS programs claim BLOCK_M x SUBTILES
    BLOCK_V GEMM tiles in grouped order; compacted X and W through descriptors; the epilogue runs on
    one BLOCK_V tile at a time, so a tile's partials are those of the pointer driver."""
    BLOCK_N: tl.constexpr = SUBTILES * BLOCK_V
    n_tiles = tl.cdiv(n_rows, BLOCK_M) * tl.cdiv(vocab_size, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, n_rows, vocab_size, BLOCK_M, BLOCK_N, GROUP_M)
        acc = raw_tile_tma(x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, hidden_size,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < n_rows
        targets = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1).to(tl.int32)
        if SUBTILES == 1:
            forward_epilogue(acc, pid_n, pid_m * BLOCK_M, offs_m, row_mask, targets, b_ptr, table_ptr,
                             target_logit_ptr, slot_ptr, excl_ptr, n_rows, vocab_size, stride_slot, logit_scale,
                             softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, WITH_STATS, STORE_LOGITS,
                             SLOT_DESCRIPTOR, BLOCK_V)
        else:
            left, right = column_halves(acc, BLOCK_M, BLOCK_V)
            forward_epilogue(left, 2 * pid_n, pid_m * BLOCK_M, offs_m, row_mask, targets, b_ptr, table_ptr,
                             target_logit_ptr, slot_ptr, excl_ptr, n_rows, vocab_size, stride_slot, logit_scale,
                             softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, WITH_STATS, STORE_LOGITS,
                             SLOT_DESCRIPTOR, BLOCK_V)
            if (2 * pid_n + 1) * BLOCK_V < vocab_size:  # the last right half may lie past the vocabulary
                forward_epilogue(right, 2 * pid_n + 1, pid_m * BLOCK_M, offs_m, row_mask, targets, b_ptr, table_ptr,
                                 target_logit_ptr, slot_ptr, excl_ptr, n_rows, vocab_size, stride_slot, logit_scale,
                                 softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, WITH_STATS, STORE_LOGITS,
                                 SLOT_DESCRIPTOR, BLOCK_V)


def logprob_forward(hidden, weight, bias, rows, targets, *, transform=None, with_stats=False, slot=None,
                    x_scored=None):
    """Per-(vocabulary tile, row) softmax partials of the selected rows of `hidden` ([N, H]).

    rows: int64 [n] indices into hidden; targets: int64 [n] in [0, V); transform: see
    logits_tile.tile_arguments. Returns (table, target_logit): table float32 [2 or 6, tiles, n]
    (m, s and, with statistics, a, q, u, b as in the module docstring), target_logit float32 [n].
    With `slot` ([>= n, V], unit column stride, any float dtype) the tiles' exp(z - m) land there too
    (m: the tile's row maximum, table[0]), and a third value
    comes back: the target-free sums e, float32 [tiles, n] (module docstring). x_scored: hidden[rows]
    when the caller has it (the persistent driver reads the scored rows compacted; else it gathers them).
    """
    n_rows, (vocab_size, hidden_size) = rows.numel(), weight.shape
    cfg = gemm_config(hidden.dtype, device_capability(hidden.device), hidden_size)
    n_tiles = triton.cdiv(vocab_size, cfg["BLOCK_V"])
    fields = STAT_FIELDS if with_stats else PLAIN_FIELDS
    table = torch.empty((fields, n_tiles, n_rows), device=hidden.device, dtype=torch.float32)
    target_logit = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    store = slot is not None
    excl = torch.empty((n_tiles, n_rows), device=hidden.device, dtype=torch.float32) if store else None
    if store:
        assert slot.is_floating_point() and slot.stride(1) == 1 and slot.shape[1] == vocab_size
    outputs = dict(table_ptr=table, target_logit_ptr=target_logit, slot_ptr=slot if store else table,
                   excl_ptr=excl if store else table, stride_slot=slot.stride(0) if store else 0,
                   WITH_STATS=with_stats, STORE_LOGITS=store)
    has_softcap = transform is not None and transform.softcap is not None
    persistent = persistent_config(hidden.dtype, device_capability(hidden.device), hidden_size,
                                   widest_epilogue=store and with_stats and has_softcap)
    if persistent is None:
        grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]) * n_tiles,)
        logprob_forward_kernel[grid](**tile_arguments(hidden, weight, bias, rows, targets, transform), **outputs, **cfg)
    elif n_rows:
        gemm_tiles = triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(n_tiles, persistent["SUBTILES"])
        grid, persistent = persistent_launch(persistent, gemm_tiles, hidden.device)
        if store and descriptor_ready(slot):  # else the pointer store, same values
            outputs.update(slot_ptr=TensorDescriptor.from_tensor(slot, [cfg["BLOCK_M"], cfg["BLOCK_V"]]))
        logprob_forward_tma_kernel[grid](
            **descriptor_arguments(hidden, weight, bias, rows, targets, transform, cfg, persistent, x_scored),
            **outputs, **dict(cfg, **persistent), SLOT_DESCRIPTOR=not isinstance(outputs["slot_ptr"], torch.Tensor))
    return (table, target_logit, excl) if store else (table, target_logit)
