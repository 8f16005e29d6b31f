"""Time the forward and d_logits kernels under other tile configurations than kernels/config.py's (GPU only).

    python tools/tile_sweep.py [--tokens 16384 --hidden 4096 --vocab 128256] [--json OUT]

For each candidate (BLOCK_M, BLOCK_V, BLOCK_K, GROUP_M, num_warps, num_stages) it patches the launchers'
gemm_config, checks that the forward's log-probs still agree with the default's (same math, other
summation order), and reports do_bench times next to cuBLAS for the same GEMM (X W^T in bf16). A
candidate only earns a place in config.py after tests/test_compile.py builds it without spills.
Candidates run on the pointer driver (one program per tile); the last row, "persistent", is the
default configuration on config.persistent_config's driver (on sm_90: TMA, 128 x 256 accumulators),
so one run compares the two drivers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PERSISTENT = "persistent"  # the default tiles on the persistent driver

CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),  # the default on sm_90
    dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_V=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    PERSISTENT,
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import importlib

    import triton.testing

    # the modules (the package exports functions of the same names)
    logprob_forward = importlib.import_module("fastdpo.kernels.logprob_forward")
    logprob_backward = importlib.import_module("fastdpo.kernels.logprob_backward")
    config = importlib.import_module("fastdpo.kernels.config")

    n, hidden, vocab = args.tokens, args.hidden, args.vocab
    h = torch.randn(n, hidden, device="cuda").bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden**-0.5 * 3).bfloat16()
    rows = torch.arange(n, device="cuda")
    targets = torch.randint(0, vocab, (n,), device="cuda")
    lse = torch.randn(n, device="cuda") + 12
    grad = torch.randn(n, device="cuda")
    width = 32768
    ws = torch.empty(n, width, device="cuda", dtype=torch.bfloat16)
    chunk_out = torch.empty(n, width, device="cuda", dtype=torch.bfloat16)

    def cublas_logits():
        for c0 in range(0, vocab, width):
            c1 = min(vocab, c0 + width)
            torch.mm(h, w[c0:c1].T, out=chunk_out[:, : c1 - c0])

    results = {"shape": [n, hidden, vocab], "cublas_ms": triton.testing.do_bench(cublas_logits), "rows": []}
    print(f"cuBLAS logits {results['cublas_ms']:.2f} ms", flush=True)
    reference = None
    for cfg in CANDIDATES:
        row = dict(driver=PERSISTENT) if cfg == PERSISTENT else dict(cfg, driver="pointer")
        config.PERSISTENT_TMA = cfg == PERSISTENT
        patched = config.gemm_config if cfg == PERSISTENT else (lambda *_a, cfg=cfg, **_k: dict(cfg))
        for module in (logprob_forward, logprob_backward):
            module.gemm_config = patched
        try:
            table, target = logprob_forward.logprob_forward(h, w, None, rows, targets)
            lse_now = torch.logsumexp(table[0] + table[1].log(), 0)
            reference = lse_now if reference is None else reference
            row["lse_max_diff"] = float((lse_now - reference).abs().max())
            row["forward_ms"] = triton.testing.do_bench(lambda: logprob_forward.logprob_forward(h, w, None, rows, targets))

            def grads():
                for c0 in range(0, vocab, width):
                    c1 = min(vocab, c0 + width)
                    logprob_backward.logits_grad(h, w, None, rows, targets, lse, grad, ws[:, : c1 - c0], c0,
                                                 x_scored=h)  # rows = all of h: the backward's X_scored

            row["logits_grad_ms"] = triton.testing.do_bench(grads)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or fit is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
