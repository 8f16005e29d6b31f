"""Arithmetic model of an LM-head log-prob step (forward + backward) on a GPU: a MODEL until measured.

    python tools/cost_model.py [--device h100|h200] [--markdown] [--frozen-head] [--stats]
                               [--workspace-mib N] [--kept-fraction F --kept-shared S]
                               [--tflops X --hbm-tbps Y --l2-mb Z --sms N]

For a shape (n scored tokens, hidden H, vocabulary V) and dtype it lists, per phase of each design, the FLOPs,
the HBM bytes, the bytes moved by atomics or locked read-modify-writes, the workspace, and a predicted time;
then totals and the peak memory above the inputs. With --kept-fraction F < 1 the table adds fastdpo with
grad_tolerance at that kept fraction of (token block, vocabulary tile) pairs; --markdown always shows
its dense-vs-sparse table over F. fastdpo's phases follow the launch configurations the code
would use: `gemm_config`, `vocab_chunk_width` and `default_workspace_bytes` are read
from fastdpo.kernels.config at every call, never copied. The peers follow their published code (versions in
each function's docstring); `OLD_FASTDPO` is fastdpo's earlier row-block design, which the current one replaced.

How a phase's time is predicted (every number below is an assumption, stated once, here):
- compute  = FLOPs / (device GEMM rate x efficiency). The rate is cuBLAS's measured bf16 rate (H100: 798
  TFLOP/s on an 8192^3 product in this workplace; H200: what cuBLAS reached on the head's own GEMM shapes),
  so cuBLAS GEMMs get efficiency 1.0, fastdpo's and CCE's Triton GEMM-tiled kernels the measured
  TRITON_EFFICIENCY (0.74 of cuBLAS on the same shape; fastdpo's recompute TRITON_RECOMPUTE_EFFICIENCY, 0.69),
  quack's CuTe GEMMs 1.0. Elementwise and reduction passes have no compute term.
- memory   = HBM bytes / HBM bandwidth (H100: 3.0 TB/s device-to-device copy measured here).
- atomics  = atomic bytes / ATOMIC_BYTES_PER_S (1 TB/s, 4 bytes per fp32 atomic add or per 16-bit locked
  read+write). Calibration: Cut Cross-Entropy's unfiltered backward, 8192 x 2304 x 256000 on an A100, is
  5.7e10 locked adds (227 GB) plus 6P of A100 GEMM (93 ms): 227 + 93 = 320 ms predicted, 324 ms published.
  Atomic time is added to max(compute, memory), not overlapped: a program stalls on its adds/locks after
  its GEMM main loop, and at these tile sizes one program occupies the SM.
- phase    = max(compute, memory) + atomics + LAUNCH_S per kernel launch.

How HBM bytes are counted for a tiled GEMM (`operand_traffic`): programs own (BLOCK_M x BLOCK_N) output tiles
and run in grouped order (GROUP_M row blocks sweep all column tiles together, Triton's matmul tutorial; cuBLAS
is modelled with CUBLAS_TILING). The resident programs (one wave: SMs x programs per SM) cover a window of
GROUP_M row blocks x (resident / GROUP_M) column tiles. Operand tiles used by programs of the same window are
read from HBM once. A row block is reused from L2 across the whole sweep only when the window's operands
(GROUP_M row blocks + the window's column tiles, each over all of K) fit in L2_USABLE of the L2; otherwise
every row block is re-read once per window step. Column tiles are read once per group of concurrently
resident row blocks. Outputs are written once. This is what makes the old design's forward cost 270 GB:
its window is 128 token blocks of 1 MiB (over the L2), re-read for each of 2004 vocabulary tiles.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/cost_model.py` puts tools/ first on sys.path
    sys.path.insert(0, str(REPO))



def _load_kernel_config():
    """fastdpo.kernels.config; loaded from its file when the package's kernels do not import (a work-in-progress
    tree): the launch configuration is all the model needs, never the kernels themselves."""
    try:
        from fastdpo.kernels import config
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_fastdpo_kernel_config", REPO / "kernels" / "config.py")
        config = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config)
    return config


kernel_config = _load_kernel_config()  # functions are looked up at call time, so tests can monkeypatch them

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

# Triton's GEMM-tiled kernels against cuBLAS on the same GEMM, measured on an H200 (torch 2.11, triton 3.6;
# benchmarks/results/nvidia-h200/gpu_check.md, gpu_check-run2.md and tile_sweep.json): the forward kernel
# (128 x 128 x 64, 4 stages) took 1.31-1.37x the chunked cuBLAS logits GEMM at three shapes in two runs and
# 1.35x in the tile sweep, median 0.74 of cuBLAS's rate; the backward's recompute (logits_grad, which
# also writes d_logits) 1.36-1.52x, median 0.69. Until these runs the model assumed 0.85 for both.
TRITON_EFFICIENCY = 0.74
TRITON_RECOMPUTE_EFFICIENCY = 0.69
CUBLAS_EFFICIENCY = 1.0
CUTE_EFFICIENCY = 1.0
ATOMIC_BYTES_PER_S = 1.0e12
LAUNCH_S = 5e-6
L2_USABLE = 0.75  # the H100's L2 is two partitions; other traffic shares it
ATOMIC_ADD_BYTES = 4  # one fp32 atomic add, or one 16-bit locked load + store


@dataclass(frozen=True)
class Device:
    """Ceilings of one GPU. Defaults come from measurements in this workplace where there are any."""

    name: str
    gemm_flops: float  # dense 16-bit GEMM FLOP/s reached by cuBLAS
    hbm_bytes_per_s: float  # device-to-device copy, bytes read + written
    l2_bytes: float
    sms: int
    memory_bytes: float
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    capability: int = 90
    tf32_flops: float = 400e12  # lead: datasheet dense tf32 ~495, not measured here
    fp32_flops: float = 60e12  # lead: datasheet FMA ~67, not measured here
    atomic_bytes_per_s: float = ATOMIC_BYTES_PER_S

    def flops_for(self, dtype: torch.dtype) -> float:
        if dtype != torch.float32:
            return self.gemm_flops
        return self.tf32_flops if torch.backends.cuda.matmul.allow_tf32 else self.fp32_flops


DEVICES = {
    # H100 SXM: 798 TFLOP/s (8192^3 bf16 mm) and 3.0 TB/s copy measured on this workplace's H100 (KINDS.md).
    "h100": Device("H100 80GB (model)", 800e12, 3.0e12, 50e6, 132, 80e9),
    # H200: cuBLAS ran the head's chunk GEMMs (logits, dX, dW at 16k x 4096 x 128k, 4k x 4096 x 128k and
    # 8k x 2304 x 256k, bf16) at 651-701 TFLOP/s, median 680, in benchmarks/results/nvidia-h200/gpu_check.md
    # and gpu_check-run2.md, while the 8192^3 product read 793 and 702 in those runs: the model takes 680.
    # 4.2 TB/s device copy measured in both runs (datasheet 4.8 TB/s), 60 MB L2 reported by torch.
    "h200": Device("H200 141GB (model)", 680e12, 4.2e12, 60e6, 132, 141e9),
}


@dataclass(frozen=True)
class Shape:
    n: int  # scored tokens (rows of the head's GEMMs)
    hidden: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    tokens: int | None = None  # positions of the hidden-state tensor (prompts included); default n
    seq_len: int = 1024  # sequence length, for designs that chunk by preference pair

    @property
    def positions(self) -> int:
        return self.n if self.tokens is None else self.tokens

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def P(self) -> float:
        return float(self.n) * self.hidden * self.vocab


@dataclass(frozen=True)
class Options:
    frozen_head: bool = False  # no dW
    frozen_hidden: bool = False  # no dX
    with_stats: bool = False
    bias: bool = False
    workspace_bytes: int | None = None  # None: config.default_workspace_bytes on the modelled device
    kept_fraction: float = 1.0  # share of (token block, vocab tile) pairs the backward keeps: CCE's gradient filter,
    # fastdpo's grad_tolerance plan (fastdpo_sparse; 1.0 = grad_tolerance 0, no plan)
    kept_shared: float = 0.5  # fastdpo_sparse: share of the kept pairs in tiles every token block keeps (unmeasured)


@dataclass
class Phase:
    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    atomic_bytes: float = 0.0
    launches: int = 1
    efficiency: float = CUBLAS_EFFICIENCY  # of the device's GEMM rate; irrelevant when flops == 0

    def __add__(self, other: "Phase") -> "Phase":
        return replace(self, flops=self.flops + other.flops, hbm_bytes=self.hbm_bytes + other.hbm_bytes,
                       atomic_bytes=self.atomic_bytes + other.atomic_bytes, launches=self.launches + other.launches)

    def compute_s(self, device: Device, dtype: torch.dtype) -> float:
        return self.flops / (device.flops_for(dtype) * self.efficiency) if self.flops else 0.0

    def time_s(self, device: Device, dtype: torch.dtype) -> float:
        memory_s = self.hbm_bytes / device.hbm_bytes_per_s
        atomic_s = self.atomic_bytes / device.atomic_bytes_per_s
        return max(self.compute_s(device, dtype), memory_s) + atomic_s + self.launches * LAUNCH_S

    def bound(self, device: Device, dtype: torch.dtype) -> str:
        terms = {"compute": self.compute_s(device, dtype), "memory": self.hbm_bytes / device.hbm_bytes_per_s,
                 "atomics": self.atomic_bytes / device.atomic_bytes_per_s}
        return max(terms, key=terms.get)


@dataclass
class Prediction:
    design: str
    shape: Shape
    device: Device
    phases: list[Phase]
    peak_bytes: float  # above the inputs: gradients, workspace, saved tensors, temporaries
    workspace_bytes: float = 0.0
    notes: str = ""
    details: dict = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def hbm_bytes(self) -> float:
        return sum(p.hbm_bytes for p in self.phases)

    @property
    def atomic_bytes(self) -> float:
        return sum(p.atomic_bytes for p in self.phases)

    @property
    def time_s(self) -> float:
        return sum(p.time_s(self.device, self.shape.dtype) for p in self.phases)

    def as_dict(self) -> dict:
        dt = self.shape.dtype
        return dict(design=self.design, n=self.shape.n, hidden=self.shape.hidden, vocab=self.shape.vocab,
                    dtype=str(dt).removeprefix("torch."), device=self.device.name, flops=self.flops,
                    flops_over_P=self.flops / self.shape.P, hbm_bytes=self.hbm_bytes, atomic_bytes=self.atomic_bytes,
                    workspace_bytes=self.workspace_bytes, peak_bytes=self.peak_bytes, time_ms=self.time_s * 1e3,
                    notes=self.notes, details=self.details,
                    phases=[dict(name=p.name, flops=p.flops, hbm_bytes=p.hbm_bytes, atomic_bytes=p.atomic_bytes,
                                 launches=p.launches, time_ms=p.time_s(self.device, dt) * 1e3,
                                 bound=p.bound(self.device, dt)) for p in self.phases])


# --- tiled GEMM traffic ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    block_m: int
    block_n: int
    group_m: int
    resident: int  # programs that run at once (one wave)


# cuBLAS on Hopper: persistent 128x256 tiles, one CTA per SM, grouped raster (an assumption, not read from cuBLAS).
CUBLAS_TILE = dict(block_m=128, block_n=256, group_m=8)


def cublas_tiling(device: Device) -> Tiling:
    return Tiling(resident=device.sms, **CUBLAS_TILE)


def programs_per_sm(block_m: int, block_n: int, block_k: int, num_stages: int, num_warps: int, elem: int,
                    device: Device) -> int:
    """Resident programs per SM, limited by the operand pipeline's shared memory and by warps."""
    smem = max(1, num_stages) * (block_m + block_n) * block_k * elem
    return max(1, min(device.smem_per_sm // smem, device.max_warps_per_sm // num_warps))


def triton_tiling(cfg: dict, elem: int, device: Device) -> Tiling:
    per_sm = programs_per_sm(cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_K"], cfg["num_stages"], cfg["num_warps"],
                             elem, device)
    return Tiling(cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["GROUP_M"], device.sms * per_sm)


def operand_traffic(m: int, n: int, k: int, a_elem: int, b_elem: int, tiling: Tiling,
                    device: Device) -> tuple[float, float]:
    """HBM bytes read for A [m, k] and B [n, k] by a grouped-order tiled GEMM (see the module docstring)."""
    blocks_m, blocks_n = math.ceil(m / tiling.block_m), math.ceil(n / tiling.block_n)
    rows_window = min(tiling.group_m, blocks_m)
    cols_window = max(1, tiling.resident // rows_window)
    if cols_window >= blocks_n:  # the wave spans every column tile, hence more row blocks than one group
        rows_window = min(blocks_m, max(rows_window, tiling.resident // blocks_n))
        cols_window = blocks_n
    a_block = tiling.block_m * k * a_elem
    b_tile = tiling.block_n * k * b_elem
    l2 = device.l2_bytes * L2_USABLE
    a_total, b_total = float(m) * k * a_elem, float(n) * k * b_elem
    window = rows_window * a_block + cols_window * b_tile
    a_reads = a_total if window <= l2 else a_total * math.ceil(blocks_n / cols_window)
    b_reads = b_total if b_total + rows_window * a_block <= l2 else b_total * math.ceil(blocks_m / rows_window)
    return a_reads, b_reads


def gemm_phase(name: str, m: int, n: int, k: int, a_elem: int, b_elem: int, out_bytes: float, tiling: Tiling,
               device: Device, efficiency: float, extra_bytes: float = 0.0, launches: int = 1) -> Phase:
    a_reads, b_reads = operand_traffic(m, n, k, a_elem, b_elem, tiling, device)
    return Phase(name, flops=2.0 * m * n * k, hbm_bytes=a_reads + b_reads + out_bytes + extra_bytes,
                 launches=launches, efficiency=efficiency)


def memory_phase(name: str, nbytes: float, launches: int = 1) -> Phase:
    return Phase(name, hbm_bytes=nbytes, launches=launches)


def chunk_widths(total: int, width: int) -> list[int]:
    width = max(1, min(width, total))
    return [min(width, total - start) for start in range(0, total, width)]


def merge_phases(phases: list[Phase]) -> list[Phase]:
    """Sum phases of the same name (one per chunk) into one, keeping first-seen order."""
    merged: dict[str, Phase] = {}
    for p in phases:
        merged[p.name] = merged[p.name] + p if p.name in merged else p
    return list(merged.values())


# --- fastdpo (GEMM-tiled forward, backward in vocabulary chunks), read from kernels/config.py -------------------------

# The merge kernel (kernels/partials_merge.py) reads the table's m field, then every field once more: (1 + F)
# [vocab tiles, n] fp32 fields of reads, F rows of writes; the per-tile lse kept for the backward plan when
# grad_tolerance > 0 (fastdpo_sparse) is 3 more passes over one field.
INDEX_BYTES = 8  # int64 rows and targets


def default_workspace(device: Device, shape: Shape) -> int:
    """config.default_workspace_bytes for the shape on `device` (it reads the shapes and the launch tile)."""
    with mock.patch.object(torch.cuda, "get_device_capability", lambda *_a, **_k: divmod(device.capability, 10)):
        return kernel_config.default_workspace_bytes(torch.device("cuda"), shape.n, shape.vocab, shape.hidden,
                                                     shape.dtype)


def fastdpo(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """GEMM-tiled forward with a [F, vocab tiles, n] partials table, backward in vocabulary chunks
    (Triton d_logits into a workspace, then cuBLAS dX and dW), no atomics, no fp32 [V, H] buffer."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    cfg = kernel_config.gemm_config(shape.dtype, device.capability, shape.hidden)
    tiling = triton_tiling(cfg, e, device)
    vocab_tiles = math.ceil(V / cfg["BLOCK_V"])
    field_bytes = 4.0 * vocab_tiles * n  # one fp32 [vocab tiles, n] field of the table
    fields = 6 if options.with_stats else 2
    workspace = options.workspace_bytes if options.workspace_bytes is not None else default_workspace(device, shape)
    width = kernel_config.vocab_chunk_width(n, V, e, cfg["BLOCK_V"], workspace)
    widths = chunk_widths(V, width)
    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    row_io = n * (4 + 4 + INDEX_BYTES)  # lse, upstream grad, targets per row

    phases = _forward_phases(shape, device, options, tiling, fields, field_bytes)
    if need_dw:
        phases.append(memory_phase("X_scored gather", 2.0 * n * H * e + INDEX_BYTES * n))
    if need_dx:
        phases.append(memory_phase("dX_scored zeros", 4.0 * n * H))
    chunk_phases = []
    for c in widths:
        chunk_phases.append(gemm_phase("logits_grad kernel (recompute)", n, c, H, e, e, n * c * e, tiling, device,
                                       TRITON_RECOMPUTE_EFFICIENCY, extra_bytes=row_io))
        if need_dx:  # addmm(out_dtype=fp32, out=dX_scored): the epilogue reads and writes the fp32 accumulator
            chunk_phases.append(gemm_phase("dX GEMM (cuBLAS, fp32 out)", n, H, c, e, e, 2 * 4.0 * n * H,
                                           cublas_tiling(device), device, CUBLAS_EFFICIENCY))
        if need_dw:
            chunk_phases.append(gemm_phase("dW GEMM (cuBLAS)", c, H, n, e, e, c * H * e, cublas_tiling(device), device,
                                           CUBLAS_EFFICIENCY))
        if options.bias:
            chunk_phases.append(memory_phase("db (ws.sum)", n * c * e + 4 * c))
    phases += merge_phases(chunk_phases)
    if need_dx:  # zeros [tokens, H], then fp32 -> dtype casts and index_copy in bounded row blocks
        phases.append(memory_phase("dX scatter", shape.positions * H * e + 4.0 * n * H + 3.0 * n * H * e, launches=3))

    workspace_used = n * max(widths) * e
    peak = _fastdpo_peak(shape, fields, field_bytes, workspace_used, need_dx, need_dw)
    return Prediction("fastdpo", shape, device, phases, peak, workspace_used,
                      notes=f"tile {cfg['BLOCK_M']}x{cfg['BLOCK_V']}x{cfg['BLOCK_K']} G{cfg['GROUP_M']}, "
                            f"{len(widths)} chunk(s) of {width} columns, 0 atomics",
                      details=dict(config=cfg, chunk_width=width, chunks=len(widths), workspace_budget=workspace,
                                   resident_programs=tiling.resident))


def _forward_phases(shape: Shape, device: Device, options: Options, tiling: Tiling, fields: int,
                    field_bytes: float) -> list[Phase]:
    """The forward kernel (GEMM tiles folded into the [F, vocab tiles, n] table) and its torch merge."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    return [
        gemm_phase("forward kernel", n, V, H, e, e, fields * field_bytes + 4 * n, tiling, device, TRITON_EFFICIENCY,
                   extra_bytes=2 * INDEX_BYTES * n + (V * e if options.bias else 0)),
        memory_phase("forward merge (kernel)", field_bytes * (1 + fields) + 4.0 * fields * n),
    ]


def _fastdpo_peak(shape: Shape, fields: int, field_bytes: float, workspace: float, need_dx: bool,
                  need_dw: bool) -> float:
    """README's "Memory" formula for the two-pass Triton route (tests/test_memory.py checks it on CPU), plus the
    per-row vectors: max(forward, chunks, scatter)."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    rows = n * (4 + 2 * INDEX_BYTES)  # lse, rows, targets
    forward = fields * field_bytes + 4.0 * fields * n + rows  # the table and its merge (kernels/partials_merge.py)
    dw = V * H * e if need_dw else 0.0
    dx32 = 4.0 * n * H if need_dx else 0.0
    chunk_loop = dw + workspace + (n * H * e if need_dw else 0.0) + dx32 + rows
    from fastdpo.triton_head import SCATTER_ELEMENTS  # looked up at every call, never copied

    cast_rows = min(n, SCATTER_ELEMENTS // H) * H * e if e != 4 else 0.0
    scatter = dw + dx32 + shape.positions * H * e + cast_rows + rows if need_dx else 0.0
    return max(forward, chunk_loop, scatter)


# --- fastdpo's fused route (fastdpo/triton_fused.py): 3 passes, the loss gradient formed in the forward -------------

FUSED_BLOCK_TILES = 2  # token block = 2 x BLOCK_M rows (triton_fused.StoredLogits.block_rows)
MAX_ROUNDED_DW_GEMMS = 12  # triton_fused.MAX_ROUNDED_DW_GEMMS (not imported: fastdpo.triton_fused imports Triton)


def fused_schedule(shape: Shape, block: int) -> tuple[int, int]:
    """(slots, dW GEMMs) of fused_pass.PairMajorSchedule for pairs of equal length: 2 x seq_len positions a pair,
    scored at n / positions; about one pair per dW GEMM (the blocks released together)."""
    pairs = max(1, shape.positions // (2 * shape.seq_len))
    pair_rows = math.ceil(shape.n / pairs)
    return math.ceil((pair_rows + block - 1) / block) + 1, pairs


def _fused_forward(shape: Shape, device: Device, options: Options) -> tuple[list[Phase], int, int, int]:
    """The fused routes' blocks: forward, merge and d_logits (phases, block rows, vocabulary tiles, table fields)."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    cfg = kernel_config.gemm_config(shape.dtype, device.capability, shape.hidden)
    tiling = triton_tiling(cfg, e, device)
    block = FUSED_BLOCK_TILES * cfg["BLOCK_M"]
    vocab_tiles = math.ceil(V / cfg["BLOCK_V"])
    fields = 6 if options.with_stats else 2
    phases = []
    for rows in chunk_widths(n, block):
        table = 4.0 * vocab_tiles * rows
        phases.append(gemm_phase("forward kernel (STORE_LOGITS)", rows, V, H, e, e,
                                 (fields + 1) * table + rows * V * e, tiling, device, TRITON_EFFICIENCY,
                                 extra_bytes=2 * INDEX_BYTES * rows))
        # the merge kernel's two passes, and a third over m and e for 1 - p_y
        phases.append(memory_phase("block merge + 1 - p_y (kernel)", table * (1 + fields + 2)))
        # once the block's g is known: e read, D written in place, the tile maxima read
        phases.append(memory_phase("d_logits in place (stored_logits_grad)", 2.0 * rows * V * e + table))
    return phases, block, vocab_tiles, fields


def fastdpo_fused(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """The fused route on Triton: per 256-row token block the forward kernel with STORE_LOGITS (the table, and
    the tiles in exp space into a slot in the input dtype: W read once per block) and the block's merge kernel,
    then over the rows released together (about a pair) the elementwise d_logits in place, dX (written once)
    and dW (accumulated in the weight's dtype up to MAX_ROUNDED_DW_GEMMS GEMMs, each reading and writing dW:
    fp32 beyond) on cuBLAS. A frozen head (options.frozen_head): the frozen route, fastdpo_frozen."""
    if options.frozen_head:
        return fastdpo_frozen(shape, device, options)
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    phases, block, vocab_tiles, fields = _fused_forward(shape, device, options)
    slots, gemms = fused_schedule(shape, block)
    w = e if e >= 4 or gemms <= MAX_ROUNDED_DW_GEMMS else 4  # dW accumulator bytes
    for rows in chunk_widths(n, math.ceil(n / gemms)):
        phases.append(gemm_phase("dX GEMM (cuBLAS)", rows, H, V, e, e, rows * H * e, cublas_tiling(device), device,
                                 CUBLAS_EFFICIENCY, extra_bytes=rows * H * e))  # + the index_copy
        phases.append(memory_phase("X rows gather", 2.0 * rows * H * e))
        phases.append(gemm_phase("dW GEMM (cuBLAS, accumulate)", V, H, rows, e, e, 2.0 * V * H * w,
                                 cublas_tiling(device), device, CUBLAS_EFFICIENCY))
    phases = merge_phases(phases)
    if w != e:
        phases.append(memory_phase("dW cast", (4.0 + e) * V * H))
    ring = slots * block * V * e
    held_tables = (slots * fields + 1) * 4.0 * vocab_tiles * block  # each held block's table; the last one's e
    loop = ring + V * H * w + shape.positions * H * e + held_tables + 2 * slots * block * H * e
    end = V * H * w + shape.positions * H * e + (V * H * e if w != e else 0)  # dW's cast
    return Prediction("fastdpo fused", shape, device, phases, max(loop, end), ring,
                      notes=f"{slots} slots of {block} rows, {gemms} dW GEMMs ({'fp32' if w != e else 'in place'})",
                      details=dict(slots=slots, block_rows=block, dw_gemms=gemms, dw_accumulator_bytes=w))


FROZEN_SLOTS = 4  # triton_fused.FROZEN_SLOTS: blocks per U GEMM


def fastdpo_frozen(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """The frozen route on Triton (2 passes, any upstream loss): the forward's blocks as fastdpo_fused's, D with
    g = 1 in place, U = D W (fp32) over each FROZEN_SLOTS blocks on cuBLAS; the backward g ⊙ U into dX."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    phases, block, vocab_tiles, _fields = _fused_forward(shape, device, options)
    for rows in chunk_widths(n, FROZEN_SLOTS * block):  # addmm into U's fp32 rows: read and written
        phases.append(gemm_phase("U GEMM (cuBLAS, fp32 out)", rows, H, V, e, e, 2 * 4.0 * rows * H,
                                 cublas_tiling(device), device, CUBLAS_EFFICIENCY))
    phases = merge_phases(phases)
    phases.append(memory_phase("backward: g U into dX", 4.0 * n * H + shape.positions * H * e + n * H * e, launches=3))
    ring = min(FROZEN_SLOTS, math.ceil(n / block)) * block * V * e
    forward = ring + block * H * e + 3 * 4.0 * vocab_tiles * block + 4.0 * n * H
    peak = max(forward, 8.0 * n * H + shape.positions * H * e)
    return Prediction("fastdpo frozen", shape, device, phases, peak, ring,
                      notes=f"{FROZEN_SLOTS} slots of {block} rows a U GEMM")


# --- the model beside benchmarks/gpu_check.py's measured phases -----------------------------------------------------

# gpu_check's measured phase -> the model's phases it covers (empty: the whole step).
MEASURED_TO_MODEL = {
    "cuBLAS logits (X W^T, chunked)": ("cuBLAS logits",),
    "forward kernel": ("forward kernel",),
    "forward (end to end)": ("forward kernel", "forward merge (kernel)"),
    "logits_grad kernel (recompute)": ("logits_grad kernel (recompute)",),
    "backward chunks with dX": ("logits_grad kernel (recompute)", "dX_scored zeros", "dX GEMM (cuBLAS, fp32 out)"),
    "backward chunks with dW": ("logits_grad kernel (recompute)", "X_scored gather", "dW GEMM (cuBLAS)"),
    "dX GEMM + add (cuBLAS)": ("dX_scored zeros", "dX GEMM (cuBLAS, fp32 out)"),
    "dW GEMM (cuBLAS)": ("X_scored gather", "dW GEMM (cuBLAS)"),
    "forward + backward (end to end)": (),
}


def model_device(device_name: str) -> Device:
    """The model device closest to a GPU's name (torch.cuda.get_device_name)."""
    return DEVICES["h200" if "h200" in device_name.lower() else "h100"]


def phase_rows(n: int, hidden: int, vocab: int, device_name: str = "h200", workspace_bytes: int | None = None,
               dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Modelled ms of every phase gpu_check measures (MEASURED_TO_MODEL's keys), for fastdpo's two-pass route at
    (n scored rows, H, V) on the model device named like `device_name`; workspace_bytes None: the default.
    The cuBLAS row is cuBLAS's logits GEMM alone (efficiency 1.0), the measured Triton rows' yardstick."""
    device, shape = model_device(device_name), Shape(n, hidden, vocab, dtype)
    p = fastdpo(shape, device, Options(workspace_bytes=workspace_bytes))
    e = shape.elem
    logits = gemm_phase("cuBLAS logits", n, vocab, hidden, e, e, n * vocab * e, cublas_tiling(device), device,
                        CUBLAS_EFFICIENCY)
    model = {ph.name: ph.time_s(device, dtype) * 1e3 for ph in [*p.phases, logits]}
    return {phase: sum(model.get(k, 0.0) for k in keys) if keys else p.time_s * 1e3
            for phase, keys in MEASURED_TO_MODEL.items()}


# --- fastdpo with grad_tolerance: the plan, then the block-sparse backward ------------------------------
#
# Read from the code at every call: the tiles (kernels.sparse_backward.sparse_gemm_options, which reads
# config.gemm_config), the dispatch threshold (fastdpo.triton_head.SPARSE_BREAK_EVEN) and the chunking
# (fastdpo.sparse_plan.tile_chunks, run on a stand-in kept mask with the modelled kept fraction).
#
# Which tiles the token blocks keep matters for the W traffic, and no GPU has measured it yet. `kept_shared` (s)
# splits the kept pairs: a share s sits in vocabulary tiles that every token block keeps (the frequent head of a
# Zipf-like vocabulary), the rest in tiles one block keeps alone (context-specific entries). The distinct kept
# tiles are then pairs * (s / blocks + 1 - s); gpu_check.py measures s from a real kept mask that way.
#
# L2 reuse, by kernel (same rule as operand_traffic: a re-read hits L2 only when the bytes touched between the
# two uses fit in L2_USABLE of the L2, or when the users run at the same time):
# - sparse_logits_grad, one program per kept pair in CSR order (block-major): the X block [BM, H] serves the
#   block's consecutive pairs (read once); a W tile [BV, H] is re-used by the next blocks only if one block's
#   kept W tiles fit in L2, or by the blocks in flight together (resident programs / pairs per block).
# - sparse_dx, grid (token blocks, H slices), blocks fastest: the blocks of one H slice run together and walk
#   their tiles in ascending order, so a W tile slice is read once per wave of blocks (distinct kept tiles);
#   a D tile is read once per H slice (H / BLOCK_H times) unless the whole chunk's D tiles fit in L2.
# - sparse_dw, grid (tiles of the chunk, H slices), tiles fastest: D likewise once per H slice unless the chunk's
#   D fits in L2; X[:, slice] (n x BLOCK_H) is shared by the tiles in flight and read once per wave when it fits.
# Load imbalance between token blocks (some keep more tiles) is not modelled: it lengthens the tail of a wave.

# The plan (sparse_plan.kept_pairs), passes over one fp32 [vocab tiles, n] field F, reads + writes:
# mass = exp(tile_lse - lse) 4F (two kernels), pad to whole blocks 2F, block max (cost) 1F, gather into the
# sorted order 2F, .double() 3F, fp64 cumsum 4F, worst row (fp64 amax) 2F.
PLAN_FIELD_PASSES = 18
PLAN_LAUNCHES = 16  # the field passes, argsort, masks, the target scatter, the final scatter
# Per chunk, pair_lists: nonzero twice (each a host sync), cumsums, gathers over [blocks, chunk tiles]; and
# the dispatch's kept.float().mean() and tile_chunks' .tolist() (host syncs): counted as launches.
PAIR_LIST_LAUNCHES = 12
# Alive at the plan's fp64 cumsum, in fields F: tile_lse, padded mass, sorted mass, its fp64 copy (2), the fp64
# running sum (2).
PLAN_PEAK_FIELDS = 7


def _sparse_code():
    """(sparse_gemm_options, SPARSE_BREAK_EVEN, tile_chunks), looked up at every call."""
    from fastdpo import sparse_plan, triton_head
    from fastdpo.kernels import sparse_backward

    return sparse_backward.sparse_gemm_options, triton_head.SPARSE_BREAK_EVEN, sparse_plan.tile_chunks


def stand_in_kept(blocks: int, tiles: int, fraction: float) -> torch.Tensor:
    """bool [blocks, tiles] with `fraction` of the pairs kept, spread evenly over the tiles (for the chunking)."""
    total = blocks * tiles
    count = round(fraction * total)
    kept = torch.zeros(total, dtype=torch.bool)
    if count:
        kept[torch.arange(count, dtype=torch.int64) * total // count] = True  # evenly spaced, tile-major
    return kept.view(tiles, blocks).T


def sparse_chunk_pairs(blocks: int, tiles: int, fraction: float, max_pairs: int) -> list[tuple[int, float]]:
    """(vocabulary tiles, kept pairs) per chunk, as sparse_plan.tile_chunks cuts them; pairs scaled to the exact
    fraction (the stand-in mask rounds)."""
    _, _, tile_chunks = _sparse_code()
    kept = stand_in_kept(blocks, tiles, fraction)
    total = float(kept.sum())
    scale = fraction * blocks * tiles / total if total else 0.0
    return [(last - first, float(kept[:, first:last].sum()) * scale) for first, last in tile_chunks(kept, max_pairs)]


def _reused_reads(uses: float, distinct: float, tile_bytes: float, reuse_distance: float, together: float,
                  device: Device) -> float:
    """HBM bytes for `uses` reads of `distinct` tiles: once each when the bytes between two uses fit in L2,
    else once per group of `together` users in flight at the same time."""
    if reuse_distance <= device.l2_bytes * L2_USABLE:
        return distinct * tile_bytes
    return max(distinct, uses / max(1.0, together)) * tile_bytes


def fastdpo_sparse(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """fastdpo with grad_tolerance > 0 at kept fraction options.kept_fraction of the (token block, vocabulary tile)
    pairs: the forward as without it, the plan (fastdpo.sparse_plan), then fastdpo.triton_head's dispatch: the
    block-sparse kernels (kernels/sparse_backward.py) when f <= SPARSE_BREAK_EVEN, else the dense chunks."""
    gemm_options, break_even, _ = _sparse_code()
    f = options.kept_fraction
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"kept_fraction must be in [0, 1], got {f}")
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    cfg, tiles_cfg = gemm_options(shape.dtype, device.capability, H)
    bm, bv, bh = tiles_cfg["BLOCK_M"], tiles_cfg["BLOCK_V"], tiles_cfg["BLOCK_H"]
    blocks, vocab_tiles = math.ceil(n / bm), math.ceil(V / bv)
    field_bytes = 4.0 * vocab_tiles * n
    plan = [memory_phase("sparse plan: kept_pairs (torch)", PLAN_FIELD_PASSES * field_bytes + 40.0 * blocks * vocab_tiles
                         + 2 * INDEX_BYTES * n, launches=PLAN_LAUNCHES)]
    workspace = options.workspace_bytes if options.workspace_bytes is not None else default_workspace(device, shape)
    details = dict(kept_fraction=f, kept_shared=options.kept_shared, break_even=break_even, config=cfg,
                   sparse_tiles=tiles_cfg, workspace_budget=workspace)
    if f > break_even:  # triton_head.scored_rows_backward computes the plan, then runs the dense chunks
        dense = fastdpo(shape, device, options)
        phases = dense.phases[:2] + plan + dense.phases[2:]
        peak = max(dense.peak_bytes, _plan_peak(shape, field_bytes, options))
        return Prediction("fastdpo grad_tolerance (dense dispatch)", shape, device, phases, peak,
                          dense.workspace_bytes, notes=f"f={f:.2f} > {break_even}: the plan, then the dense path",
                          details={**details, **dense.details, "path": "dense"})

    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    tile_bytes = bm * bv * e
    max_pairs = max(1, workspace // tile_bytes)  # as triton_head's sparse backward sizes its chunks
    chunks = sparse_chunk_pairs(blocks, vocab_tiles, f, max_pairs)
    resident_lg = triton_tiling(cfg, e, device).resident
    resident_gemm = device.sms * programs_per_sm(bm, bh, tiles_cfg["BLOCK_K"], tiles_cfg["num_stages"],
                                                 tiles_cfg["num_warps"], e, device)
    h_slices = math.ceil(H / bh)
    s = options.kept_shared
    l2 = device.l2_bytes * L2_USABLE
    w_row_tile = bv * H * e  # one vocabulary tile of W, all of H
    phases = list(_forward_phases(shape, device, options, triton_tiling(cfg, e, device), 2, field_bytes)) + plan
    plan_lists = memory_phase("sparse plan: pair lists + chunking (torch)", 64.0 * blocks * vocab_tiles,
                              launches=3 + PAIR_LIST_LAUNCHES * len(chunks))
    phases.append(plan_lists)
    if need_dx:
        phases.append(memory_phase("dX_scored zeros", 4.0 * n * H))
    chunk_phases = []
    for index, (chunk_tiles, pairs) in enumerate(chunks):
        share = pairs / (blocks * vocab_tiles)  # of all pairs: the FLOPs are this share of the dense 2nVH
        distinct = pairs * (s / blocks + 1 - s)  # kept tiles, counted once per tile
        per_block = pairs / blocks
        d_bytes = pairs * tile_bytes
        flops = 2.0 * share * n * V * H
        w_lg = _reused_reads(pairs, distinct, w_row_tile, per_block * w_row_tile, resident_lg / max(1.0, per_block),
                             device)
        if pairs > 0:  # an empty chunk launches no logits kernel; its dW tiles are still written (zeros)
            chunk_phases.append(Phase("sparse_logits_grad kernel", flops=flops, efficiency=TRITON_EFFICIENCY,
                                      hbm_bytes=w_lg + n * H * e + d_bytes + n * (4 + 4 + 2 * INDEX_BYTES)))
        d_reads = d_bytes if d_bytes <= l2 else d_bytes * h_slices
        if need_dx:
            w_dx = distinct * w_row_tile * math.ceil(blocks / resident_gemm)
            chunk_phases.append(Phase("sparse_dx kernel", flops=flops, efficiency=TRITON_EFFICIENCY,
                                      hbm_bytes=d_reads + w_dx + 4.0 * n * H * (2 if index else 1)))
        if need_dw:
            x_slice_fits = n * bh * e <= l2
            x_reads = min(pairs * bm * H * e,
                          n * H * e * math.ceil(chunk_tiles / resident_gemm) if x_slice_fits else math.inf)
            chunk_phases.append(Phase("sparse_dw kernel (writes every tile)", flops=flops, efficiency=TRITON_EFFICIENCY,
                                      hbm_bytes=d_reads + x_reads + chunk_tiles * bv * H * e))
    phases += merge_phases(chunk_phases)
    if need_dx:
        phases.append(memory_phase("dX scatter", shape.positions * H * e + 4.0 * n * H + 3.0 * n * H * e, launches=3))
    workspace_used = min(max_pairs, math.ceil(max(pairs for _, pairs in chunks))) * tile_bytes  # whole tiles
    dw = V * H * e if need_dw else 0.0
    dx32 = 4.0 * n * H if need_dx else 0.0
    rows = n * (4 + 2 * INDEX_BYTES)
    loop = dw + dx32 + workspace_used + field_bytes + blocks * vocab_tiles * 9.0 + rows
    scatter = dw + dx32 + (shape.positions * H * e + n * H * e if need_dx else 0.0) + field_bytes + rows
    forward = 2 * field_bytes + field_bytes + 2 * field_bytes + rows  # the table (F = 2), the plan, its two temporaries
    peak = max(forward, loop, scatter, _plan_peak(shape, field_bytes, options))
    return Prediction("fastdpo grad_tolerance (sparse)", shape, device, phases, peak, workspace_used,
                      notes=f"f={f:.2f} of {blocks}x{vocab_tiles} pairs, {len(chunks)} chunk(s), shared {s:.0%}",
                      details=dict(details, path="sparse", chunks=len(chunks), max_pairs=max_pairs,
                                   pairs=f * blocks * vocab_tiles))


def _plan_peak(shape: Shape, field_bytes: float, options: Options) -> float:
    """At the plan's cumsum: dW and dX_scored are allocated, the plan's fields alive."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    return (V * H * e * (not options.frozen_head) + 4.0 * n * H * (not options.frozen_hidden)
            + PLAN_PEAK_FIELDS * field_bytes + n * (4 + 2 * INDEX_BYTES))


def sparse_break_even(shape: Shape, device: Device, options: Options = Options(), steps: int = 200) -> float | None:
    """The smallest kept fraction at which the modelled sparse path is no faster than the dense one (None: never)."""
    dense = fastdpo(shape, device, replace(options, kept_fraction=1.0)).time_s
    for i in range(1, steps + 1):
        f = i / steps
        p = _sparse_at(shape, device, options, f)
        if p.time_s >= dense:
            return f
    return None


def _sparse_at(shape: Shape, device: Device, options: Options, f: float) -> Prediction:
    """The sparse kernels at f, whatever the dispatch threshold says."""
    with mock.patch("fastdpo.triton_head.SPARSE_BREAK_EVEN", 1.0):
        return fastdpo_sparse(shape, device, replace(options, kept_fraction=f))


# --- fastdpo's earlier row-block design, which the current one replaced -----------------------------------------------

OLD_FASTDPO = dict(forward_block_m=128, forward_block_v=64, backward_block=128, group_m=8)


def old_fastdpo(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """The earlier row-block design: one program per 128-token block walks the vocabulary in 64-wide tiles (its X block
    re-read from HBM per tile once the resident X blocks overflow L2); the backward's (128 x 128) programs
    add dX and dW with fp32 atomics into fp32 [positions, H] and [V, H] buffers, cast at the end."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    bm, bv = OLD_FASTDPO["forward_block_m"], OLD_FASTDPO["forward_block_v"]
    row_owner = Tiling(bm, bv, group_m=device.sms, resident=device.sms)  # every resident block sweeps V alone
    bb = OLD_FASTDPO["backward_block"]
    grouped = Tiling(bb, bb, OLD_FASTDPO["group_m"], device.sms)
    adds = (n * V * H / bb if need_dx else 0.0) + (n * V * H / bb if need_dw else 0.0)
    backward = gemm_phase("backward kernel (recompute + atomics)", n, V, H, e, e, 0.0, grouped, device,
                          TRITON_EFFICIENCY)
    backward.flops *= 1 + need_dx + need_dw
    backward.atomic_bytes = adds * ATOMIC_ADD_BYTES
    phases = [
        gemm_phase("forward kernel", n, V, H, e, e, 16.0 * n, row_owner, device, TRITON_EFFICIENCY),
        memory_phase("zero fp32 buffers", 4.0 * (shape.positions * H * need_dx + V * H * need_dw)),
        backward,
        memory_phase("cast fp32 -> dtype", (4.0 + e) * (shape.positions * H * need_dx + V * H * need_dw), launches=2),
    ]
    peak = (4.0 + e) * (V * H * need_dw + shape.positions * H * need_dx)
    return Prediction("fastdpo, earlier row-block design", shape, device, phases, peak,
                      notes="X re-read per 64-wide vocab tile; fp32 acq_rel atomics for dX and dW")


# --- peers ----------------------------------------------------------------------------------------------------------


def trl_chunked_head(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """TRL 1.16 `_ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py): 4096-token x 32768-column cuBLAS tiles
    into a [4096, 32768] buffer, folded by a Triton row kernel; the backward recomputes each tile, writes the
    gradient in place and adds it with addmm(out_dtype=fp32) into fp32 [n, H] and [V, H] buffers, cast at the end."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    token_chunk, vocab_chunk = 4096, 32768
    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    tiling = cublas_tiling(device)
    chunks = []
    for t in chunk_widths(n, token_chunk):
        for c in chunk_widths(V, vocab_chunk):
            tile = t * c * e
            chunks.append(gemm_phase("forward GEMM", t, c, H, e, e, tile, tiling, device, CUBLAS_EFFICIENCY))
            chunks.append(memory_phase("forward fold kernel (reads the tile)", tile))
            chunks.append(gemm_phase("recompute GEMM", t, c, H, e, e, tile, tiling, device, CUBLAS_EFFICIENCY))
            chunks.append(memory_phase("grad kernel (tile in place)", 2 * tile))
            if need_dx:  # fp32 C read and written
                chunks.append(gemm_phase("dX addmm (fp32 acc)", t, H, c, e, e, 8.0 * t * H, tiling, device,
                                         CUBLAS_EFFICIENCY))
            if need_dw:
                chunks.append(gemm_phase("dW addmm (fp32 [V, H] acc)", c, H, t, e, e, 8.0 * c * H, tiling, device,
                                         CUBLAS_EFFICIENCY))
    phases = [memory_phase("compact + zero fp32 buffers", 2.0 * n * H * e + 4.0 * (n * H * need_dx + V * H * need_dw),
                           launches=3)]
    phases += merge_phases(chunks)
    phases.append(memory_phase("cast fp32 -> dtype + scatter", (4.0 + e) * (n * H * need_dx + V * H * need_dw)
                               + shape.positions * H * e * need_dx, launches=3))
    buffer = min(n, token_chunk) * min(V, vocab_chunk) * e
    peak = (4.0 + e) * (V * H * need_dw + n * H * need_dx) + buffer + n * H * e + shape.positions * H * e * need_dx
    return Prediction("TRL 1.16 chunked head", shape, device, phases, peak, buffer,
                      notes="8P on cuBLAS; fp32 [V, H] dW buffer + its cast copy")


def _token_chunked(design: str, shape: Shape, device: Device, options: Options, chunk: int, *, efficiency: float,
                   ce_passes: int, dw_acc_elem: int, final_scale: bool, extra_bytes_per_logit: float = 0.0,
                   live_bytes_per_logit: float | None = None, fresh_dw_per_chunk: bool = False,
                   notes: str = "") -> Prediction:
    """Designs that materialize [chunk, V] logits per token chunk and compute both gradients in the forward:
    6P FLOPs. Per chunk: logits GEMM, a cross-entropy pass writing d_logits in place (`ce_passes` passes of
    the chunk, reads and writes, plus `extra_bytes_per_logit` of other elementwise traffic), dX = d_logits @ W,
    dW += d_logits^T @ X (read-modify-write of the dW accumulator, `dw_acc_elem` bytes per element). While a
    chunk is live it holds `live_bytes_per_logit` (default: the logits alone, overwritten in place)."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    tiling = cublas_tiling(device)
    chunks = []
    for i, t in enumerate(chunk_widths(n, chunk)):
        logits = t * V * e
        chunks.append(gemm_phase("logits GEMM", t, V, H, e, e, logits, tiling, device, efficiency))
        chunks.append(memory_phase("cross-entropy pass (d_logits in place)",
                                   ce_passes * logits + extra_bytes_per_logit * t * V, launches=max(1, ce_passes)))
        if need_dx:
            chunks.append(gemm_phase("dX GEMM", t, H, V, e, e, t * H * e, tiling, device, efficiency))
        if need_dw:
            if fresh_dw_per_chunk:  # a fresh [V, H] product, then grad_weight += it
                chunks.append(gemm_phase("dW GEMM (fresh [V, H])", V, H, t, e, e, V * H * e, tiling, device,
                                         efficiency))
                chunks.append(memory_phase("grad_weight += chunk dW", 3.0 * V * H * dw_acc_elem))
            else:
                rmw = (1 if i == 0 else 2) * V * H * dw_acc_elem
                chunks.append(gemm_phase("dW GEMM (accumulate)", V, H, t, e, e, rmw, tiling, device, efficiency))
    phases = merge_phases(chunks)
    if final_scale or dw_acc_elem != e:  # backward: scale by the upstream scalar and/or cast the accumulator
        phases.append(memory_phase("backward scale/cast", 2.0 * n * H * e * need_dx
                                   + (dw_acc_elem + e) * V * H * need_dw, launches=2))
    live_logits = min(n, chunk) * V * (e if live_bytes_per_logit is None else live_bytes_per_logit)
    dw_bytes = V * H * (dw_acc_elem + (e if dw_acc_elem != e or fresh_dw_per_chunk else 0)) * need_dw
    peak = live_logits + dw_bytes + n * H * e * need_dx + 4.0 * n
    return Prediction(design, shape, device, phases, peak, min(n, chunk) * V * e,
                      notes=notes or f"{len(chunk_widths(n, chunk))} token chunk(s) of {min(n, chunk)}")


def liger_flce(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """Liger-Kernel 0.8.5 fused linear cross-entropy (ops/fused_linear_cross_entropy.py): token chunks of
    next_pow2(cdiv(n, cdiv(V, H))), bf16 logits chunk, two-pass CE kernel (read, read + write in place),
    grad_weight accumulated by addmm into the weight dtype (accum_dtype=None), scaled in the backward."""
    chunk = min(shape.n, 1 << max(0, math.ceil(math.log2(math.ceil(shape.n / math.ceil(shape.vocab / shape.hidden))))))
    return _token_chunked("Liger 0.8.5 FLCE", shape, device, options, chunk, efficiency=CUBLAS_EFFICIENCY, ce_passes=3,
                          dw_acc_elem=shape.elem, final_scale=True,
                          notes=f"token chunks of {chunk}; dW accumulated in {shape.dtype} across chunks")


def liger_dpo(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """Liger-Kernel 0.8.5 LigerFusedLinearDPOLoss (chunked_loss/fused_linear_preference.py), compiled: one pair
    (2 x seq_len rows) per chunk; bf16 logits, an fp32 log-softmax kept for torch.func.grad_and_value's backward
    (read bf16 twice, write and read fp32, write bf16 d_logits: ~14 bytes per logit beyond the GEMMs'; 8 bytes
    per logit live: bf16 logits, fp32 saved, bf16 d_logits), and a fresh [V, H] dW per chunk added into
    grad_weight. Policy head only (its reference pass is excluded, as for
    every design here)."""
    return _token_chunked("Liger 0.8.5 DPO (compiled)", shape, device, options, 2 * shape.seq_len,
                          efficiency=CUBLAS_EFFICIENCY, ce_passes=0, dw_acc_elem=shape.elem, final_scale=False,
                          extra_bytes_per_logit=14, live_bytes_per_logit=8, fresh_dw_per_chunk=True,
                          notes=f"pairs of {shape.seq_len}-token sequences; every position scored")


def torch_lce(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """torch 2.13 F.linear_cross_entropy on CUDA/bf16 ("auto" = acc_policy "compact", chunking "aspect_ratio:2"):
    chunks of next_pow2(cdiv(n, cdiv(V, H))) / 2 tokens, gradients precomputed in the forward, dW accumulated
    in place by addmm_ in the input dtype."""
    aspect = 1 << max(0, math.ceil(math.log2(math.ceil(shape.n / math.ceil(shape.vocab / shape.hidden)))))
    chunk = max(1, min(shape.n, aspect // 2))
    return _token_chunked("torch 2.13 F.linear_cross_entropy", shape, device, options, chunk,
                          efficiency=CUBLAS_EFFICIENCY, ce_passes=3, dw_acc_elem=shape.elem, final_scale=True,
                          notes=f"token chunks of {chunk}; dW accumulated in {shape.dtype}")


def quack_lce(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """quack-kernels chunked_linear_cross_entropy (quack/linear_cross_entropy.py): 4096-token chunks, CuTe GEMMs,
    a one-pass CE kernel writing d_logits over the logits, dW accumulated in an fp32 [V, H] buffer
    (gemm_add_inplace), cast to the weight dtype in the backward. Needs an H100/B200."""
    return _token_chunked("quack linear CE", shape, device, options, 4096, efficiency=CUTE_EFFICIENCY, ce_passes=2,
                          dw_acc_elem=4, final_scale=True,
                          notes="token chunks of 4096; fp32 [V, H] dW accumulator")


CCE = dict(block_b=256, block_v=128, block_d=32, num_warps=8, num_stages=3, group_b=8)


def cut_cross_entropy(shape: Shape, device: Device, options: Options = Options()) -> Prediction:
    """Cut Cross-Entropy 25.1.1 (cce_lse_forward.py, cce_backward.py, default config 256 x 128 x 32, GROUP_B 8):
    forward tiles merged into a global LSE under a spin lock, target logits by an indexed dot; one backward
    kernel recomputes each tile and, unless its |d_logits| < eps (the filter: `kept_fraction` of tiles
    remain), adds dE (BLOCK_B x D) and dC (BLOCK_V x D) under locks into bf16 buffers."""
    n, H, V, e = shape.n, shape.hidden, shape.vocab, shape.elem
    need_dx, need_dw = not options.frozen_hidden, not options.frozen_head
    per_sm = programs_per_sm(CCE["block_b"], CCE["block_v"], CCE["block_d"], CCE["num_stages"], CCE["num_warps"], e,
                             device)
    tiling = Tiling(CCE["block_b"], CCE["block_v"], CCE["group_b"], device.sms * per_sm)
    programs = math.ceil(n / CCE["block_b"]) * math.ceil(V / CCE["block_v"])
    forward = gemm_phase("lse forward kernel (locked merge)", n, V, H, e, e, 4.0 * n, tiling, device,
                         TRITON_EFFICIENCY)
    forward.atomic_bytes = programs * CCE["block_b"] * 8.0  # lock + fp32 read/write of BLOCK_B lse values
    kept = options.kept_fraction
    backward = gemm_phase("backward kernel (recompute + locked dE/dC)", n, V, H, e, e, 0.0, tiling, device,
                          TRITON_EFFICIENCY)
    backward.flops += kept * 2.0 * shape.P * (need_dx + need_dw)
    adds = kept * shape.P * (need_dx / CCE["block_v"] + need_dw / CCE["block_b"])
    backward.atomic_bytes = adds * ATOMIC_ADD_BYTES
    phases = [forward, memory_phase("indexed dot (target logits)", 2.0 * n * H * e + 4 * n),
              memory_phase("zero dE, dC", e * (n * H * need_dx + V * H * need_dw)), backward]
    peak = e * (n * H * need_dx + V * H * need_dw) + 8.0 * n
    return Prediction("Cut Cross-Entropy 25.1.1", shape, device, phases, peak,
                      notes=f"locked 16-bit adds, {kept:.0%} of tiles kept by the filter")


DESIGNS = {
    "fastdpo": fastdpo,
    "fastdpo_fused": fastdpo_fused,
    "old_fastdpo": old_fastdpo,
    "trl": trl_chunked_head,
    "liger_flce": liger_flce,
    "liger_dpo": liger_dpo,
    "cce": cut_cross_entropy,
    "quack": quack_lce,
    "torch_lce": torch_lce,
}


def predict_all(shape: Shape, device: Device, options: Options = Options()) -> list[Prediction]:
    """Every design; fastdpo with grad_tolerance too when the options keep less than every pair."""
    preds = [fn(shape, device, options) for fn in DESIGNS.values()]
    if options.kept_fraction < 1.0:
        preds.insert(1, fastdpo_sparse(shape, device, options))
    return preds


def dense_floor_s(shape: Shape, device: Device, options: Options = Options()) -> float:
    """8P (6P with a frozen head, 6P with frozen hidden states) at the device's cuBLAS rate."""
    products = 2 + 2 + (not options.frozen_hidden) * 2 + (not options.frozen_head) * 2
    return products * shape.P / device.flops_for(shape.dtype)


# --- the GPU case set and the report --------------------------------------------------------------------------------

CASES = [
    ("llama3-8b 4k", Shape(4096, 4096, 128256)),
    ("llama3-8b 8k", Shape(8192, 4096, 128256)),
    ("llama3-8b 16k", Shape(16384, 4096, 128256)),
    ("llama3-8b 32k", Shape(32768, 4096, 128256)),
    ("gemma-like 8k (V=256000, H=2304)", Shape(8192, 2304, 256000)),
]
TARGET_RATIO = 1.25  # the GEMM-tiled design's target: within 1.25x of 8P at cuBLAS speed (Llama-3-8B, 16k)


def summary_table(device: Device, options: Options = Options(), cases=CASES) -> str:
    head = ("| case | design | FLOPs / P | HBM GB | atomics GB | workspace MiB | peak above inputs GiB "
            "| predicted ms | x dense floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, shape in cases:
        floor = dense_floor_s(shape, device, options)
        for p in predict_all(shape, device, options):
            lines.append(f"| {label} | {p.design} | {p.flops / shape.P:.1f} | {p.hbm_bytes / GB:.1f} "
                         f"| {p.atomic_bytes / GB:.0f} | {p.workspace_bytes / MiB:.0f} | {p.peak_bytes / GiB:.2f} "
                         f"| {p.time_s * 1e3:.1f} | {p.time_s / floor:.2f} |")
    return "\n".join(lines)


def phase_table(p: Prediction) -> str:
    dt = p.shape.dtype
    lines = ["| phase | GFLOP | HBM GB | atomics GB | launches | ms | bound by |", "|---|---|---|---|---|---|---|"]
    for ph in p.phases:
        lines.append(f"| {ph.name} | {ph.flops / 1e9:.0f} | {ph.hbm_bytes / GB:.2f} | {ph.atomic_bytes / GB:.0f} "
                     f"| {ph.launches} | {ph.time_s(p.device, dt) * 1e3:.2f} | {ph.bound(p.device, dt)} |")
    lines.append(f"| **total** | {p.flops / 1e9:.0f} | {p.hbm_bytes / GB:.2f} | {p.atomic_bytes / GB:.0f} "
                 f"| {sum(ph.launches for ph in p.phases)} | {p.time_s * 1e3:.2f} | |")
    return "\n".join(lines)


def target_line(device: Device, options: Options = Options()) -> str:
    shape = dict(CASES)["llama3-8b 16k"]
    p = fastdpo(shape, device, options)
    floor = dense_floor_s(shape, device, options)
    verdict = "meets" if p.time_s <= TARGET_RATIO * floor else "MISSES"
    return (f"fastdpo at Llama-3-8B 16k: {p.time_s * 1e3:.1f} ms predicted vs the dense floor "
            f"{floor * 1e3:.1f} ms ({p.time_s / floor:.2f}x; target <= {TARGET_RATIO}x: {verdict})")


SPARSE_TARGET_RATIO = 0.6  # grad_tolerance's target: <= 0.6x the dense path at trained-LM-like inputs' f
SPARSE_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)
SPARSE_PHASE_FRACTION = 0.1
SHARING_CASES = (("every block keeps the same tiles", 1.0), ("half shared", 0.5), ("each block its own", 0.0))


def sparse_target_line(device: Device, options: Options) -> str:
    shape = dict(CASES)["llama3-8b 16k"]
    dense = fastdpo(shape, device, replace(options, kept_fraction=1.0))
    p = fastdpo_sparse(shape, device, options)
    ratio = p.time_s / dense.time_s
    verdict = "meets" if ratio <= SPARSE_TARGET_RATIO else "MISSES"
    return (f"fastdpo grad_tolerance at Llama-3-8B 16k, f={options.kept_fraction:g} ({p.details['path']} path, "
            f"{options.kept_shared:.0%} of kept pairs in shared tiles): {p.time_s * 1e3:.1f} ms vs dense "
            f"{dense.time_s * 1e3:.1f} ms ({ratio:.2f}x; target <= {SPARSE_TARGET_RATIO}x: {verdict})")


def sparse_table(device: Device, options: Options = Options(), fractions=SPARSE_FRACTIONS) -> str:
    """fastdpo dense vs the sparse backward at each kept fraction, Llama-3-8B 16k, under each sharing assumption."""
    shape = dict(CASES)["llama3-8b 16k"]
    _, break_even, _ = _sparse_code()
    dense = fastdpo(shape, device, replace(options, kept_fraction=1.0)).time_s
    head = "| kept fraction f | dense ms | " + " | ".join(f"sparse ms, {label} (x dense)" for label, _ in SHARING_CASES)
    head += " | dispatch takes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f in fractions:
        cells = []
        for _label, shared in SHARING_CASES:
            p = _sparse_at(shape, device, replace(options, kept_shared=shared), f)
            cells.append(f"{p.time_s * 1e3:.1f} ({p.time_s / dense:.2f})")
        taken = "sparse" if f <= break_even else "dense (+ plan)"
        lines.append(f"| {f:g} | {dense * 1e3:.1f} | " + " | ".join(cells) + f" | {taken} |")
    evens = []
    for label, shared in SHARING_CASES:
        even = sparse_break_even(shape, device, replace(options, kept_shared=shared))
        evens.append(f"{label}: f = {even:.3f}" if even is not None else f"{label}: never")
    lines += ["", f"Modelled break-even (sparse no faster than dense), f in steps of 0.005: {'; '.join(evens)}. "
                  f"fastdpo.triton_head.SPARSE_BREAK_EVEN = {break_even}."]
    return "\n".join(lines)


def markdown_report(device: Device, options: Options = Options()) -> str:
    llama16k = dict(CASES)["llama3-8b 16k"]
    old = old_fastdpo(llama16k, device, options)
    return "\n\n".join([
        f"### Predicted cost on {device.name}: a model, not a measurement",
        f"Ceilings: {device.gemm_flops / 1e12:.0f} TFLOP/s 16-bit GEMM, {device.hbm_bytes_per_s / 1e12:.1f} TB/s HBM, "
        f"{device.l2_bytes / 1e6:.0f} MB L2 ({L2_USABLE:.0%} counted usable), {device.sms} SMs, "
        f"{device.atomic_bytes_per_s / 1e12:.1f} TB/s of atomic/locked adds; Triton GEMM kernels at "
        f"{TRITON_EFFICIENCY:.0%} of the cuBLAS rate. bf16, head and hidden states trainable, no bias, all tokens "
        f"scored, policy head only. 'x dense floor' = predicted / (8P at the cuBLAS rate).",
        target_line(device, options),
        summary_table(device, options),
        "#### fastdpo per phase, Llama-3-8B head, 16k tokens",
        phase_table(fastdpo(llama16k, device, options)),
        "#### The design it replaces, same shape",
        phase_table(old),
        "#### fastdpo with grad_tolerance, Llama-3-8B head, 16k tokens: dense vs sparse backward (a model)",
        sparse_table(device, options),
        f"##### The sparse path per phase at f = {SPARSE_PHASE_FRACTION}, half the kept pairs in shared tiles",
        phase_table(_sparse_at(llama16k, device, replace(options, kept_shared=0.5), SPARSE_PHASE_FRACTION)),
    ])


def text_report(device: Device, options: Options = Options()) -> str:
    lines = [f"MODEL (not measured) on {device.name}", target_line(device, options)]
    if options.kept_fraction < 1.0:
        lines.append(sparse_target_line(device, options))
    return "\n".join(lines + ["", summary_table(device, options)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/cost_model.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=sorted(DEVICES), default="h100")
    p.add_argument("--markdown", action="store_true", help="the docs/cost_model.md section: summary + per-phase tables")
    p.add_argument("--frozen-head", action="store_true")
    p.add_argument("--frozen-hidden", action="store_true")
    p.add_argument("--stats", action="store_true", help="forward statistics (entropy, ...) in the table")
    p.add_argument("--workspace-mib", type=float, default=None, help="default: config.default_workspace_bytes")
    p.add_argument("--kept-fraction", type=float, default=1.0,
                   help="share of (token block, vocab tile) pairs kept: CCE's filter and fastdpo's grad_tolerance "
                        "(below 1 adds fastdpo's sparse backward to the table)")
    p.add_argument("--kept-shared", type=float, default=0.5,
                   help="fastdpo sparse: share of the kept pairs in tiles every token block keeps (W reuse)")
    p.add_argument("--tflops", type=float, default=None, help="override the 16-bit GEMM rate")
    p.add_argument("--hbm-tbps", type=float, default=None, help="override the HBM bandwidth")
    p.add_argument("--l2-mb", type=float, default=None)
    p.add_argument("--sms", type=int, default=None)
    args = p.parse_args(argv)
    for name in ("kept_fraction", "kept_shared"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    return args


def device_from_args(args: argparse.Namespace) -> Device:
    device = DEVICES[args.device]
    overrides = {k: v for k, v in (("gemm_flops", args.tflops and args.tflops * 1e12),
                                   ("hbm_bytes_per_s", args.hbm_tbps and args.hbm_tbps * 1e12),
                                   ("l2_bytes", args.l2_mb and args.l2_mb * 1e6), ("sms", args.sms)) if v}
    return replace(device, name=device.name.replace("(model)", "(custom)"), **overrides) if overrides else device


def options_from_args(args: argparse.Namespace) -> Options:
    ws = None if args.workspace_mib is None else int(args.workspace_mib * MiB)
    return Options(frozen_head=args.frozen_head, frozen_hidden=args.frozen_hidden, with_stats=args.stats,
                   workspace_bytes=ws, kept_fraction=args.kept_fraction, kept_shared=args.kept_shared)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, options = device_from_args(args), options_from_args(args)
    print(markdown_report(device, options) if args.markdown else text_report(device, options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
