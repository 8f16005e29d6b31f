"""Peak memory above the inputs of one forward + backward, route by route, against README's formula ("Memory").

LiveBytes (tests/helpers.py) follows every tensor the step creates until it is freed. Its peak must lie within
`peak_formula` plus per-position bookkeeping, and above 85% of the formula, so that the formula neither misses
a buffer nor counts one that does not exist. The PyTorch path runs single-threaded (dispatch modes are per
thread, and the formula takes one worker part).
"""

from __future__ import annotations

import pytest
import torch
from helpers import LiveBytes

import fastdpo
from fastdpo import chunked, fused_pass, triton_fused
from fastdpo.kernels import config
from fastdpo.kernels.config import default_workspace_bytes, gemm_config, vocab_chunk_width
from fastdpo.sequences import shifted_targets
from fastdpo.triton_head import SCATTER_ELEMENTS

PAIRS, SEQ_LEN, HIDDEN, VOCAB = 2, 90, 48, 300
# Bookkeeping beside the formula's buffers: per position (targets, masks, the loss's per-token vectors) and per
# scored row (row indices, lse, the forward's merged partials), a few dozen bytes each.
SLACK_PER_POSITION = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def peak_formula(route: str, backend: str, *, n: int, N: int, H: int, V: int, dtype: torch.dtype,
                 workspace: int | None = None, slots: int = 0, with_stats: bool = False,
                 on_cuda: bool = False) -> int:
    """README's "Memory" formula: the peak bytes above the inputs of a forward + backward (gradients included).

    route: 'two-pass' or 'fused' with a trainable head, 'two-pass frozen' or 'fused frozen' with a frozen one;
    n scored rows of N positions; `workspace` the two-pass Triton backward's bound (None: the default);
    `slots` the fused route's pair-schedule slots. Linear heads without bias (softcap or bias: one more tile
    on the PyTorch path), without statistics on the fused Triton route."""
    e, a = dtype.itemsize, 4  # input and accumulation bytes
    trainable = not route.endswith("frozen")
    dw, dw_acc = (V * H * e, V * H * a) if trainable else (0, 0)
    cast = e * (N * H + (V * H if trainable else 0)) if e != a else 0  # accumulators cast at the end
    if backend == "triton":
        cfg = gemm_config(dtype, None, H)
        table = (6 if with_stats else 2) * cdiv(V, cfg["BLOCK_V"]) * n * 4  # [F, vocabulary tiles, n] fp32
        if route.startswith("two-pass"):
            if workspace is None:
                workspace = default_workspace_bytes(torch.device("cpu"), n, V, H, dtype)
            width = vocab_chunk_width(n, V, e, cfg["BLOCK_V"], workspace)
            # Off CUDA (Triton's interpreter) a 16-bit chunk product is formed before it is added: n H e more.
            product = n * H * e if e != a and not on_cuda else 0
            chunks = dw + n * width * e + (n * H * e if trainable else 0) + n * H * a + product
            rows_cast = min(n, SCATTER_ELEMENTS // H) * H * e if e != a else 0
            scatter = dw + n * H * a + N * H * e + rows_cast
            return max(table, chunks, scatter)  # the forward: the table (merged row by row by a kernel)
        rows = min(triton_fused.StoredLogits.block_rows(chunked.Rows(torch.empty(0, H, dtype=dtype), None, None)), n)
        slot = rows * triton_fused.padded_vocab(V, dtype) * e  # exp-space tiles in the input dtype, D in place
        # Off CUDA (Triton's interpreter) a 16-bit product is formed before it is added into fp32: its size more.
        product = rows * H * e if e != a and not on_cuda else 0
        block_field = cdiv(V, cfg["BLOCK_V"]) * rows * 4  # a block's [tiles, rows] fp32
        if route == "fused frozen":
            # The forward: FROZEN_SLOTS slots, the block's X rows (the persistent driver's operand) and table, U = D W
            # over the slots' rows and U [n, H] fp32; the backward: U, g U and dX.
            group = min(triton_fused.FROZEN_SLOTS, cdiv(n, rows))
            forward = group * (slot + product) + rows * H * e + 3 * block_field + a * n * H  # m, s and e
            return max(forward, 2 * a * n * H + e * N * H)
        # The ring of slots and each held block's table (m, s; the last one's e too), dW (the weight's dtype: few
        # GEMMs here), dX [N, H] in the hidden states' dtype; a released run's X rows and dX product ([run, H] each).
        return slots * (slot + 2 * block_field + 2 * rows * H * e) + block_field + dw + N * H * e
    rows = min(chunked.TOKEN_BLOCK, n)
    width = min(V, chunked.vocab_slices(V, rows)[0][1])
    buffers = a * (2 * rows * H + rows * width)  # BlockBuffers, one part
    if route == "two-pass":
        return a * N * H + dw_acc + buffers + cast
    if route == "two-pass frozen":
        return a * N * H + buffers + cast
    if route == "fused":
        # The blocks released together run their backward together: their dX rows, a part's share of them and the
        # part's D buffer of them, one slice wide.
        return slots * rows * (V + 2 * H + width) * a + a * N * H + dw_acc + buffers + cast
    # fused frozen: the forward holds U [n, H], its W[y] gather and a part's [block, H] beside the buffers;
    # the backward U, g U and dX.
    return max(buffers + a * rows * H + 2 * a * n * H, 2 * a * n * H + e * N * H + (e * n * H if e != a else 0))


def batch(dtype, frozen):
    hs = torch.randn(2 * PAIRS, SEQ_LEN, HIDDEN).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN) * HIDDEN**-0.5 * 2).to(dtype).requires_grad_(not frozen)
    labels = torch.randint(0, VOCAB, (2 * PAIRS, SEQ_LEN))
    labels[:, :5] = -100
    labels[1, SEQ_LEN // 2:] = -100  # ragged: a shorter rejected sequence
    return hs, w, labels


def slots(labels, backend, dtype) -> int:
    rows = (shifted_targets(labels).reshape(-1) != -100).nonzero().squeeze(1)
    block = chunked.TOKEN_BLOCK
    if backend == "triton":
        block = triton_fused.StoredLogits.block_rows(chunked.Rows(torch.empty(0, HIDDEN, dtype=dtype), None, None))
    return fused_pass.pair_schedule(backend, rows, labels.shape[1], labels.shape[0] // 2, block).slots


def measured_and_formula(backend, dtype, frozen, fused, workspace=None):
    hs, w, labels = batch(dtype, frozen)
    n, N = int((shifted_targets(labels) != -100).sum()), labels.numel()
    loss = fastdpo.FastDPOLoss(backend=backend, fused=fused, reference_free=True, workspace_bytes=workspace)
    with LiveBytes() as recorder:
        loss(hs, w, labels).loss.backward()
    route = ("fused" if fused else "two-pass") + (" frozen" if frozen else "")
    fused_workspace = None if route.startswith("fused") else workspace
    formula = peak_formula(route, backend, n=n, N=N, H=HIDDEN, V=VOCAB, dtype=dtype, workspace=fused_workspace,
                           slots=slots(labels, backend, dtype))
    return recorder.peak, formula, N


ROUTES = [(backend, dtype, frozen, fused) for backend, dtype in
          [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]
          for frozen in (False, True) for fused in (False, True)]


@pytest.mark.parametrize("backend,dtype,frozen,fused", ROUTES,
                         ids=[f"{b}-{str(d)[6:]}-{'frozen' if fr else 'trainable'}-{'fused' if fu else 'two-pass'}"
                              for b, d, fr, fu in ROUTES])
def test_peak_is_within_the_formula(backend, dtype, frozen, fused, one_thread):
    peak, formula, positions = measured_and_formula(backend, dtype, frozen, fused)
    assert peak <= formula + SLACK_PER_POSITION * positions, (peak, formula)
    assert peak >= 0.85 * formula, (peak, formula)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_smallest_memory_setting_is_within_the_formula(dtype, frozen, one_thread):
    """fused=False with a one-tile workspace (README's smallest-memory setting): the formula at that bound."""
    peak, formula, positions = measured_and_formula("triton", dtype, frozen, False, workspace=1)
    default_peak, _, _ = measured_and_formula("triton", dtype, frozen, False)
    assert peak <= formula + SLACK_PER_POSITION * positions, (peak, formula)
    assert peak >= 0.85 * formula, (peak, formula)
    assert peak < default_peak  # the default chunk here is the whole vocabulary (H < n)


@pytest.mark.parametrize("n,hidden,vocab", [(16384, 4096, 128256), (41295, 2048, 128256), (512, 4096, 128256),
                                           (9999, 2304, 256000), (100, 31, 1000)])
def test_default_chunk_is_the_fewest_tiles_that_fill_the_chunk_gemms(n, hidden, vocab):
    """config.default_chunk_width: whole BLOCK_V tiles, C * min(n, H) >= 2^24 with one tile less falling short,
    or the whole vocabulary; the workspace is n x C in the input dtype, from the shapes alone."""
    block_v = 128
    width = config.default_chunk_width(n, vocab, hidden, block_v)
    assert width % block_v == 0
    fill = min(n, hidden)
    if width < vocab:
        assert width * fill >= config.MIN_CHUNK_GEMM_OUTPUT > (width - block_v) * fill
    else:
        assert width == cdiv(vocab, block_v) * block_v
    if (n, hidden) == (16384, 4096):
        assert width == 4096  # ~4k columns at H = 4096
    workspace = config.default_workspace_bytes(torch.device("cpu"), n, vocab, hidden, torch.float16)
    interpreter_block = gemm_config(torch.float16, None, hidden)["BLOCK_V"]
    assert workspace == n * config.default_chunk_width(n, vocab, hidden, interpreter_block) * 2
