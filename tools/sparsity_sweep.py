"""How the kept fraction and the speed of fastdpo's sparse backward move with the trained-LM model's parameters.

    python tools/sparsity_sweep.py [--out benchmarks/results/cpu-sparsity] [--rounds 3] [--settings N]

CPU quick shape (8 x 257 tokens, H=256, V=65,536, fp32), inputs from inputs.make_lm_inputs: one parameter of
LMShape varied at a time around the default. Per setting: the kept fraction at grad_tolerance=2^-10 (the plan
fastdpo computes, see measure.kept_fraction), and forward+backward times of fastdpo exact (grad_tolerance=0),
fastdpo with grad_tolerance=2^-10 and Cut Cross-Entropy's CPU path (impl="torch_compile"), measured in
interleaved rounds in one process (the machine is shared: ratios within a round are what is compared; their
median and spread over the rounds are reported), with the machine's load. Peak memory of every implementation
needs one process each: `python benchmarks/run.py --sparse` measures it on the default setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import impls, inputs, measure  # noqa: E402
from benchmarks.run import MachineLoad, describe_load  # noqa: E402
from benchmarks.worker import leaf_inputs  # noqa: E402

CASE = inputs.Case("cpu-2k-h256-v64k-lm", "sweep", 8, 257, 256, 65536, "float32", inputs="lm")
DEFAULT = inputs.LMShape()
VARIED = {"zipf": (1.0, 1.25, 2.0), "context_entries": (64, 1024), "context_strength": (4.0, 12.0),
          "target_entropy": (1.0, 3.0)}
IMPLS = {"exact": lambda inp, case: impls.make_fastdpo_tol(inp, case, tolerance=0.0),
         "tol": impls.make_fastdpo_tol, "cce": impls.make_cce}


def settings() -> list[inputs.LMShape]:
    out = [DEFAULT]
    for field, values in VARIED.items():
        out += [replace(DEFAULT, **{field: v}) for v in values]
    return out


def time_setting(shape: inputs.LMShape, rounds: int) -> dict:
    saved = inputs.make_lm_inputs(CASE, shape)
    stats = inputs.input_stats(saved, None)
    kept = measure.kept_fraction(saved["hidden"], saved["weight"], saved["labels"], None)
    runs = {}
    for name, make in IMPLS.items():
        inp = leaf_inputs(saved)
        run, _ = make(inp, CASE)
        measure.step(run, inp["hidden"], inp["weight"])  # warm-up (CCE compiles here)
        runs[name] = (run, inp)
    times = {name: [] for name in IMPLS}
    for _ in range(rounds):  # interleaved: a burst of load hits every implementation of a round alike
        for name, (run, inp) in runs.items():
            t0 = time.perf_counter()
            measure.step(run, inp["hidden"], inp["weight"])
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratio = {other: [t / e for t, e in zip(times["tol"], times[other])] for other in ("exact", "cce")}
    return {"shape": asdict(shape), **stats, "kept_fraction": kept, "times_ms": times,
            "tol_over_exact": _summary(ratio["exact"]), "tol_over_cce": _summary(ratio["cce"])}


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def markdown(results: dict) -> str:
    lines = ["# fastdpo sparse backward: kept fraction and speed on the trained-LM model (CPU)", "",
             f"`{results['command']}`", "",
             f"Shape: {CASE.n_seqs} x {CASE.seq_len} tokens, H={CASE.hidden}, V={CASE.vocab:,}, fp32; inputs from "
             "`benchmarks/inputs.py:make_lm_inputs` (a model of a trained LM's softmax, not a trained LM). "
             f"Default parameters: {asdict(DEFAULT)}; each row changes one. kept: the share of (128-token block, "
             "vocabulary slice) pairs the backward computes at grad_tolerance=2^-10. Times: median of "
             f"{results['rounds']} interleaved rounds in one process; ratios per round, median [min-max].", "",
             "| zipf s | K | b | target H | H achieved | target top-1 | target log-p | kept | exact ms | tol ms "
             "| CCE ms | tol / exact | tol / CCE |", "|" + "---|" * 13]
    for r in results["settings"]:
        s, t = r["shape"], r["times_ms"]
        cells = [f"{s['zipf']:g}", str(s["context_entries"]), f"{s['context_strength']:g}", f"{s['target_entropy']:g}",
                 f"{r['mean_entropy']:.2f}", f"{r['target_top1']:.2f}", f"{r['mean_target_logp']:.2f}",
                 f"{r['kept_fraction']:.3f}"]
        cells += [f"{statistics.median(t[k]):,.0f}" for k in ("exact", "tol", "cce")]
        cells += [f"{r[k]['median']:.2f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]" for k in ("tol_over_exact", "tol_over_cce")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Machine load: {describe_load(results['machine_load'])}.", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/sparsity_sweep.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runs" / "sparsity")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", type=int, default=None, help="only the first N settings (the default first)")
    args = p.parse_args(argv)
    import torch

    torch.manual_seed(0)
    load = MachineLoad()
    chosen = settings()[:args.settings]
    results = {"command": "python tools/sparsity_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "device": "cpu", "rounds": args.rounds, "versions": impls.versions(), "settings": []}
    for i, shape in enumerate(chosen):
        row = time_setting(shape, args.rounds)
        results["settings"].append(row)
        print(f"[{i + 1}/{len(chosen)}] {asdict(shape)}: kept {row['kept_fraction']:.3f}, tol/exact "
              f"{row['tol_over_exact']['median']:.2f}, tol/cce {row['tol_over_cce']['median']:.2f}", flush=True)
        save(results, load, args.out)  # after every setting: an interrupted sweep still leaves its rows
    print(markdown(results))
    return 0


def save(results: dict, load: MachineLoad, out: Path) -> None:
    results["machine_load"] = load.summary()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
