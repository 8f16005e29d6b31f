"""results.json, results.md and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

ROW_KEYS = ("impl", "case", "tokens", "hidden", "vocab", "dtype", "ms", "peak_mem_bytes", "rel_err", "status")
STATUS_PREFIXES = ("ok", "skipped: ", "error: ")
MiB = 1 << 20


def validate(results: dict) -> None:
    """Raise ValueError when `results` does not follow the results.json schema (issue 5)."""
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


def table(results: dict) -> str:
    """Markdown table, one row per (case, impl); the status column keeps skips and errors visible."""
    gpu = any("roofline" in r for r in results["rows"])
    head = ["case", "impl", "tokens", "H", "V", "dtype", "ms", "peak MiB", "rel err"]
    head += ["x cuBLAS", "TFLOP/s"] if gpu else []
    lines = ["| " + " | ".join(head + ["status"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in results["rows"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / MiB
        cells = [r["case"], r["impl"], str(r["tokens"]), str(r["hidden"]), str(r["vocab"]), r["dtype"],
                 _fmt(r["ms"], ".1f"), _fmt(mem, ".1f"), _fmt(r["rel_err"], ".1e")]
        if gpu:
            cells += [_fmt(r.get("roofline"), ".2f"), _fmt(r.get("tflops"), ".0f")]
        status = r["status"].replace("|", "/")
        lines.append("| " + " | ".join(cells + [status if len(status) < 120 else status[:117] + "..."]) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = [f"# fastdpo benchmark: {results['device']}", ""]
    if results.get("command"):
        parts += [f"`{results['command']}`", ""]
    parts += ["Sigmoid DPO (beta 0.1, zero reference log-probs) from hidden states [2B, T, H] and an LM head [V, H]: "
              "forward + backward. ms: median; peak MiB: memory above the inputs during one step (on CPU the peak RSS "
              "of that step in the implementation's own process, glibc's mmap threshold fixed at 128 KiB); "
              "rel err: the "
              "largest of the relative errors of the loss and of the hidden/weight gradients against float64.", ""]
    if results.get("cases"):
        parts += ["| case | tokens scored | mean entropy (nats) | target is top-1 | mean target log-prob |"
                  + (" cuBLAS 4-GEMM ms |" if any("cublas_ms" in c for c in results["cases"].values()) else ""),
                  "|---|---|---|---|---|" + ("---|" if any("cublas_ms" in c for c in results["cases"].values())
                                              else "")]
        for name, c in results["cases"].items():
            cells = [name, str(c.get("valid_tokens", "-")), _fmt(c.get("mean_entropy"), ".2f"),
                     _fmt(c.get("target_top1"), ".2f"), _fmt(c.get("mean_target_logp"), ".2f")]
            if "cublas_ms" in c:
                cells.append(_fmt(c["cublas_ms"], ".1f"))
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    parts += [table(results), "", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(parts)


def write_markdown(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.md"
    path.write_text(markdown(results))
    return path


def write_plots(results: dict, out_dir: Path, case_groups: dict[str, str]) -> list[Path]:
    """time.png and memory.png: one panel per case group, x = tokens, one line per implementation.

    A group measured at a single token count (the quick CPU set) gets horizontal bars instead: a column
    of points on one x would hide implementations behind each other.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return []
    groups = sorted({case_groups.get(r["case"], r["case"]) for r in results["rows"]})
    impls = list(dict.fromkeys(r["impl"] for r in results["rows"]))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # the same colour in every panel
    paths = []
    for key, label, scale, fname in (("ms", "forward+backward (ms)", 1.0, "time.png"),
                                     ("peak_mem_bytes", "peak memory above inputs (MiB)", 1 / MiB, "memory.png")):
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
        for ax, group in zip(axes[0], groups):
            series = {}
            for impl in impls:
                pts = sorted((r["tokens"], r[key] * scale) for r in results["rows"]
                             if r["impl"] == impl and r["status"] == "ok" and r[key] is not None
                             and case_groups.get(r["case"], r["case"]) == group)
                if pts:
                    series[impl] = pts
            _draw_panel(ax, series, colors, label, group)
        fig.suptitle(f"{results['device']}: {label}")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def _draw_panel(ax, series: dict, colors: dict, label: str, title: str) -> None:
    token_counts = sorted({tokens for pts in series.values() for tokens, _ in pts})
    if len(token_counts) == 1:
        names = list(series)
        values = [series[name][0][1] for name in names]
        bars = ax.barh(names, values, color=[colors[name] for name in names])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in values], fontsize=8, padding=2)
        ax.invert_yaxis()  # first implementation on top
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 4)  # room for the labels
        ax.set_xlabel(label)
        ax.set_title(f"{title}, {token_counts[0]} tokens")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        return
    for impl, pts in series.items():
        ax.plot(*zip(*pts), marker="o", label=impl, color=colors[impl])
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel(label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
