"""How dW = sum over groups of D_g^T X_g loses accuracy when a 16-bit gradient is the accumulator.

The fused pass forms each group's dW contribution D_g^T X_g (a GEMM with fp32 accumulation) and adds it
into dW group by group. With a float32 weight the accumulator is dW itself (exact to fp32). With a 16-bit
weight the choices are:

- fp32 accumulator: an extra [V, H] fp32 buffer (4 bytes a weight, 2 GB at Llama-3-8B's head), cast once;
- 16-bit accumulation, round to nearest: no extra buffer; each add rounds to 8 significant bits, so the
  error grows like sqrt(k) 2^-9 relative over k groups (and biases small contributions away);
- 16-bit accumulation, stochastic rounding: no extra buffer; unbiased, same order of error per add;
- fewer, larger groups: k smaller (the workspace grows with the group).

This script measures the relative Frobenius error of each against a float64 dW, for a range of group
counts, on the CPU (the rounding of an add does not depend on the device). The D and X rows are drawn
like a DPO step's: D = g (onehot - softmax(z)) with logits of a fixed scale, X ~ N(0, 1) rows.

    python tools/dw_accumulation.py --out benchmarks/results/cpu-dw-accumulation
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def stochastic_round_(acc16: torch.Tensor, value32: torch.Tensor, gen: torch.Generator) -> None:
    """acc16 = round_stochastic(acc16 + value32), bfloat16 only: add 16 random low bits, truncate."""
    total = (acc16.float() + value32).view(torch.int32)
    noise = torch.randint(0, 1 << 16, total.shape, generator=gen, dtype=torch.int32)
    acc16.copy_(((total + noise) & ~0xFFFF).view(torch.float32))


def group_products(tokens: int, hidden: int, vocab: int, groups: int, gen: torch.Generator):
    """k groups of (D_g^T X_g) in fp32 (what a GEMM with fp32 accumulation returns) and their float64 sum."""
    rows = tokens // groups
    exact = torch.zeros(vocab, hidden, dtype=torch.float64)
    products = []
    for _ in range(groups):
        x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
        z = 3.0 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
        d = -torch.softmax(z, dim=-1)
        d[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] += 1.0
        d *= torch.randn(rows, 1, generator=gen, dtype=torch.float64).abs() / tokens  # g: a per-row scalar
        product = d.T @ x
        exact += product
        products.append(product.float())
    return products, exact


def errors(products, exact, dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    norm = exact.norm().item()

    def rel(dw):
        return (dw.double() - exact).norm().item() / norm

    fp32 = torch.zeros_like(products[0])
    nearest = torch.zeros(products[0].shape, dtype=dtype)
    stochastic = torch.zeros(products[0].shape, dtype=torch.bfloat16)
    for p in products:
        fp32 += p
        nearest.copy_(nearest.float() + p)
        stochastic_round_(stochastic, p, gen)
    name = str(dtype).removeprefix("torch.")
    out = {"fp32 accumulator, cast once": rel(fp32.to(dtype)), f"{name} accumulator, nearest": rel(nearest)}
    if dtype == torch.bfloat16:
        out["bfloat16 accumulator, stochastic"] = rel(stochastic)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--groups", default="1,2,4,8,16,32,64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for k in (int(g) for g in args.groups.split(",")):
        gen = torch.Generator().manual_seed(args.seed)
        products, exact = group_products(args.tokens, args.hidden, args.vocab, k, gen)
        for dtype in (torch.bfloat16, torch.float16):
            for name, err in errors(products, exact, dtype, gen).items():
                rows.append({"groups": k, "weight dtype": str(dtype).removeprefix("torch."), "accumulation": name,
                             "relative error": err, "sqrt(k) 2^-9": math.sqrt(k) * 2.0**-9})
    lines = ["| groups k | weight | accumulation | relative error vs float64 | sqrt(k)·2⁻⁹ |", "|---|---|---|---|---|"]
    lines += [f"| {r['groups']} | {r['weight dtype']} | {r['accumulation']} | {r['relative error']:.2e} | "
              f"{r['sqrt(k) 2^-9']:.2e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        shape = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, seed=args.seed)
        (args.out / "results.json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))
        (args.out / "results.md").write_text(
            f"# dW accumulated over k groups: error against float64\n\n`python tools/dw_accumulation.py "
            f"--out {args.out}` ({shape}, torch {torch.__version__}, CPU)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
