"""results.json, results.md and the plots.

    python -m benchmarks.report DIR     # redraw DIR/results.md and the plots from DIR/results.json
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

ROW_KEYS = ("impl", "case", "tokens", "hidden", "vocab", "dtype", "ms", "peak_mem_bytes", "rel_err", "status")
STATUS_PREFIXES = ("ok", "skipped: ", "error: ")
MiB = 1 << 20


def validate(results: dict) -> None:
    """Raise ValueError when `results` does not follow the results.json schema."""
    if not isinstance(results.get("device"), str):
        raise ValueError("device must be a string")
    if not isinstance(results.get("versions"), dict):
        raise ValueError("versions must be a dict")
    for i, row in enumerate(results.get("rows", [])):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}")
        status = row["status"]
        if not (status == "ok" or status.startswith(STATUS_PREFIXES[1:])):
            raise ValueError(f"row {i}: bad status {status!r}")
        if status == "ok" and any(row[k] is None for k in ("ms", "peak_mem_bytes", "rel_err")):
            raise ValueError(f"row {i}: an ok row needs ms, peak_mem_bytes and rel_err")
        if status == "ok" and row.get("ms_min") is not None and not row["ms_min"] <= row["ms"] <= row["ms_max"]:
            raise ValueError(f"row {i}: needs ms_min <= ms <= ms_max")
    if "rows" not in results:
        raise ValueError("rows missing")


def _json_safe(x):
    # json.dumps would write NaN/Infinity, which strict JSON readers reject
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(results: dict, out_dir: Path) -> Path:
    validate(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _spread(r) -> str:
    """'min-max (n runs)' of a row's timed runs; '-' where they were not recorded (older results files)."""
    runs = r.get("runs")
    if r.get("ms_min") is None:
        return f"- ({runs})" if runs else "-"
    if runs == 1:
        return "1 run"
    return f"{r['ms_min']:.1f}-{r['ms_max']:.1f}" + (f" ({runs})" if runs else "")


def table(results: dict) -> str:
    """Markdown table, one row per (case, impl); the status column keeps skips and errors visible."""
    gpu = any("roofline" in r for r in results["rows"])
    sparse = any(r.get("kept_fraction") is not None for r in results["rows"])
    head = ["case", "impl", "tokens", "H", "V", "dtype", "ms (median)", "min-max (runs)", "peak MiB", "rel err"]
    head += ["x cuBLAS", "TFLOP/s"] if gpu else []
    head += ["kept"] if sparse else []
    lines = ["| " + " | ".join(head + ["status"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in results["rows"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / MiB
        cells = [r["case"], r["impl"], str(r["tokens"]), str(r["hidden"]), str(r["vocab"]), r["dtype"],
                 _fmt(r["ms"], ".1f"), _spread(r), _fmt(mem, ".1f"), _fmt(r["rel_err"], ".1e")]
        if gpu:
            cells += [_fmt(r.get("roofline"), ".2f"), _fmt(r.get("tflops"), ".0f")]
        if sparse:
            cells.append(_fmt(r.get("kept_fraction"), ".3f"))
        status = r["status"].replace("|", "/")
        lines.append("| " + " | ".join(cells + [status if len(status) < 120 else status[:117] + "..."]) + " |")
    return "\n".join(lines)


def notes(results: dict) -> list[str]:
    """One line per implementation: what it ran (its adapter's note, e.g. fastdpo's backend)."""
    seen = {}
    for r in results["rows"]:
        if r.get("note") and r["impl"] not in seen:
            seen[r["impl"]] = r["note"]
    return [f"- {impl}: {note}" for impl, note in seen.items()]


def markdown(results: dict) -> str:
    parts = [f"# fastdpo benchmark: {results['device']}", ""]
    if results.get("command"):
        parts += [f"`{results['command']}`", ""]
    parts += ["Sigmoid DPO (beta 0.1, zero reference log-probs) from hidden states [2B, T, H] and an LM head [V, H]: "
              "forward + backward. ms: median of the timed runs, min-max: their spread (runs: how many; "
              "one run for a step slower than the time budget); peak MiB: memory above the inputs during one step (on CPU the peak RSS "
              "of that step in the implementation's own process, glibc's mmap threshold fixed at 128 KiB); "
              "rel err: the "
              "largest of the relative errors of the loss and of the hidden/weight gradients against float64.", ""]
    if results.get("cases"):
        parts += ["| case | inputs | tokens scored | mean entropy (nats) | target is top-1 | mean target log-prob "
                  "| kept at grad_tolerance 2^-10 |"
                  + (" cuBLAS 4-GEMM ms |" if any("cublas_ms" in c for c in results["cases"].values()) else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if any("cublas_ms" in c for c in results["cases"].values())
                                              else "")]
        for name, c in results["cases"].items():
            cells = [name, c.get("inputs", "clustered"), str(c.get("valid_tokens", "-")),
                     _fmt(c.get("mean_entropy"), ".2f"), _fmt(c.get("target_top1"), ".2f"),
                     _fmt(c.get("mean_target_logp"), ".2f"), _fmt(c.get("kept_fraction"), ".3f")]
            if "cublas_ms" in c:
                cells.append(_fmt(c["cublas_ms"], ".1f"))
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    parts += [table(results), ""]
    if any(r["status"] == "ok" and r.get("ms_min") is None for r in results["rows"]):
        parts += ["min-max `-`: this run predates recording the spread (its runs per row in parentheses).", ""]
    if notes(results):
        parts += ["What each implementation ran:", "", *notes(results), ""]
    parts += ["Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    load = results.get("machine_load")
    if load and load.get("other_processes_cores") is not None:
        parts += [f"Machine load: the run took {load['wall_s']:.0f} s; other processes used "
                  f"{load['other_processes_cores']:.2f} of {load['cores']} cores on average (load average "
                  f"{load['loadavg_start']:.1f} at the start, {load['loadavg_end']:.1f} at the end).", ""]
    return "\n".join(parts)


def write_markdown(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.md"
    path.write_text(markdown(results))
    return path


PLOTS = (("ms", "forward+backward (ms), median; whiskers: min-max of the runs", 1.0, "time.png"),
         ("peak_mem_bytes", "peak memory above inputs (MiB)", 1 / MiB, "memory.png"))


def write_plots(results: dict, out_dir: Path, case_groups: dict[str, str] | None = None) -> list[Path]:
    """time.png and memory.png: one panel per case group.

    A group measured at a single token count gets horizontal bars on a linear axis, each labelled with its value
    and its ratio to fastdpo; implementations without a number (skipped, failed) keep their place with their
    status written in. Groups over several token counts get lines (x = tokens), legend outside the axes.
    case_groups defaults to the groups recorded in results["cases"].
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install -e \".[bench]\")")
        return []
    if case_groups is None:
        case_groups = {name: c.get("group", name) for name, c in results.get("cases", {}).items()}
    group_of = {r["case"]: case_groups.get(r["case"], r["case"]) for r in results["rows"]}
    groups = list(dict.fromkeys(group_of[r["case"]] for r in results["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in results["rows"]))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # the same colour in every panel
    paths = []
    for key, label, scale, fname in PLOTS:
        fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 0.45 * len(impls) + 2.2),
                                 squeeze=False)
        for ax, group in zip(axes[0], groups):
            rows = [r for r in results["rows"] if group_of[r["case"]] == group]
            if len({r["tokens"] for r in rows}) == 1:
                _draw_bars(ax, rows, key, scale, colors, label)
            else:
                _draw_lines(ax, rows, key, scale, colors, label)
            ax.set_title(group if len({r["tokens"] for r in rows}) > 1 else f"{group}, {rows[0]['tokens']} tokens",
                         fontsize=10)
        fig.suptitle(f"{results['device']}: {label.split(',')[0]}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def _value(r, key, scale):
    return r[key] * scale if r["status"] == "ok" and r[key] is not None else None


def _whiskers(rows, key, values):
    """(below, above) error-bar lengths from the recorded min/max time; zero where none was recorded."""
    lo, hi = [], []
    for r, v in zip(rows, values):
        has = key == "ms" and v is not None and r.get("ms_min") is not None
        lo.append(v - r["ms_min"] if has else 0.0)
        hi.append(r["ms_max"] - v if has else 0.0)
    return lo, hi


def _short_status(status: str) -> str:
    status = re.sub(r" \([^()]*\)", "", status)  # the exception text in parentheses; the reason and the hint stay
    return status if len(status) <= 90 else status[:87] + "..."


def _draw_bars(ax, rows, key, scale, colors, label) -> None:
    names = [r["impl"] for r in rows]
    values = [_value(r, key, scale) for r in rows]
    base = next((v for r, v in zip(rows, values) if r["impl"] == "fastdpo" and v), None)
    lo, hi = _whiskers(rows, key, values)
    ys = range(len(rows))
    has_spread = any(lo) or any(hi)  # older results files recorded no min/max
    ax.barh(ys, [v or 0.0 for v in values], color=[colors[n] for n in names],
            xerr=[lo, hi] if has_spread else None, error_kw={"elinewidth": 1, "capsize": 3})
    top = max([(v or 0.0) + h for v, h in zip(values, hi)] + [1e-9])
    for y, r, v, h in zip(ys, rows, values, hi):
        if v is None:
            ax.text(top * 0.01, y, _short_status(r["status"]), va="center", fontsize=7, color="0.35", style="italic")
            continue
        text = f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
        if key == "ms" and r.get("runs") == 1:
            text += " (1 run)"
        if base:
            text += f"  ({v / base:.2f}x fastdpo)" if v / base < 10 else f"  ({v / base:.0f}x fastdpo)"
        ax.text(v + h + top * 0.01, y, text, va="center", fontsize=8)
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()  # first implementation on top
    ax.set_xlim(0, top * 1.6)  # room for the labels, right of the longest bar
    if key == "ms" and not any(r.get("ms_min") is not None for r in rows):
        label = label.split(";")[0] + " (min/max not recorded in this run)"
    ax.set_xlabel(label)
    ax.grid(True, axis="x", alpha=0.3)


def _draw_lines(ax, rows, key, scale, colors, label) -> None:
    missing = []
    order = list(dict.fromkeys(r["impl"] for r in rows))
    for impl in order:
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["tokens"])
        ok = [r for r in mine if _value(r, key, scale) is not None]
        missing += [f"{impl} at {r['tokens']}: {_short_status(r['status'])}" for r in mine if r not in ok]
        if not ok:
            continue
        values = [_value(r, key, scale) for r in ok]
        lo, hi = _whiskers(ok, key, values)
        ax.errorbar([r["tokens"] for r in ok], values, yerr=[lo, hi] if any(lo) or any(hi) else None,
                    marker="o", capsize=3, label=impl, color=colors[impl],
                    zorder=3 + len(order) - order.index(impl))  # fastdpo (first) on top where lines meet
    ax.set_xlabel("tokens")
    if key == "ms" and not any(r.get("ms_min") is not None for r in rows):
        label = label.split(";")[0] + "\n(min/max not recorded in this run)"
    ax.set_ylabel(label)
    ax.set_xscale("log", base=2)
    tokens = sorted({r["tokens"] for r in rows})
    ax.set_xticks(tokens, [f"{t:,}" for t in tokens])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside the data
    if missing:
        ax.annotate("no number: " + "; ".join(missing), (0, -0.25), xycoords="axes fraction", fontsize=7,
                    color="0.35", va="top")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description="redraw results.md and the plots")
    p.add_argument("dir", type=Path, help="a folder holding results.json")
    args = p.parse_args(argv)
    results = json.loads((args.dir / "results.json").read_text())
    validate(results)
    write_markdown(results, args.dir)
    for path in write_plots(results, args.dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
