"""The fused pass's and the trainer step's targets, read from run.py's and trl_step.py's rows (gpu_check.py).

Fused pass (trainable head, bf16, sigmoid DPO, forward + backward), per case:
    fastdpo time            <= 0.8x TRL 1.16's chunked head (goal 0.7x)
    fastdpo peak above the inputs <= 0.6x TRL's
    fastdpo relative error  <= 5e-3 against float64 (the largest of loss, dX and dW)
    fastdpo peak            <= 1.6x Cut Cross-Entropy's (goal 1.3x)
    fastdpo_lean peak       <= 1.15x Cut Cross-Entropy's, with relative error <= 5e-3
    fastdpo_2pass (fused=False) beside them, without a target
Frozen head (`<case>-frozen`): fastdpo time <= 0.7x TRL's with a frozen weight, relative error (loss, dX) <= 5e-3.
"""

from __future__ import annotations

REL_ERR_TARGET = 5e-3

# (impl, against: another impl or None for the row's own value, field, target, goal); target None: shown only
TRAINABLE_CHECKS = (
    ("fastdpo", "trl", "ms", 0.8, 0.7),
    ("fastdpo", "trl", "peak_mem_bytes", 0.6, None),
    ("fastdpo", None, "rel_err", REL_ERR_TARGET, None),
    ("fastdpo", "cce", "peak_mem_bytes", 1.6, 1.3),
    ("fastdpo_lean", "cce", "peak_mem_bytes", 1.15, None),
    ("fastdpo_lean", None, "rel_err", REL_ERR_TARGET, None),
    ("fastdpo_2pass", "trl", "ms", None, None),
    ("fastdpo_2pass", "trl", "peak_mem_bytes", None, None),
    ("fastdpo_2pass", None, "rel_err", None, None),
)
FROZEN_CHECKS = (
    ("fastdpo", "trl", "ms", 0.7, None),
    ("fastdpo", "trl", "peak_mem_bytes", None, None),
    ("fastdpo", None, "rel_err", REL_ERR_TARGET, None),
)
FIELD_NAMES = {"ms": "time", "peak_mem_bytes": "peak memory", "rel_err": "relative error"}


def fused_pass_checks(rows: list[dict]) -> list[dict]:
    """One entry per case and check: value (a ratio, or the error), target, goal and ok (None: not measured, or no
    target). Cases named `*-frozen` take FROZEN_CHECKS."""
    ok_rows = {(r["case"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    checks = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for impl, against, field, target, goal in FROZEN_CHECKS if case.endswith("-frozen") else TRAINABLE_CHECKS:
            value = _value(ok_rows.get((case, impl)), ok_rows.get((case, against)) if against else None, field,
                           against is not None)
            checks.append(dict(case=case, measure=f"{impl} {FIELD_NAMES[field]}" + (f" / {against}'s" if against
                                                                                     else ""),
                               value=value, target=target, goal=goal,
                               ok=None if value is None or target is None else value <= target,
                               goal_met=None if value is None or goal is None else value <= goal))
    return checks


def _value(row: dict | None, other: dict | None, field: str, ratio: bool) -> float | None:
    if row is None or row.get(field) is None:
        return None
    if not ratio:
        return row[field]
    return row[field] / other[field] if other and other.get(field) else None


def verdict(check: dict) -> str:
    if check["value"] is None:
        return "not measured"
    if check["target"] is None:
        return "-"
    if not check["ok"]:
        return "MISSED"
    return "ok, goal met" if check.get("goal_met") else "ok" if check["goal"] is None else "ok, goal missed"


def checks_markdown(checks: list[dict]) -> list[str]:
    lines = ["| case | measure | value | target | goal | verdict |", "|---|---|---|---|---|---|"]
    for c in checks:
        spec = ".1e" if "error" in c["measure"] else ".2f"
        lines.append(f"| {c['case']} | {c['measure']} | {_fmt(c['value'], spec)} | {_fmt(c['target'], spec)} "
                     f"| {_fmt(c['goal'], spec)} | {verdict(c)} |")
    return lines


def rows_markdown(rows: list[dict]) -> list[str]:
    lines = ["| case | impl | ms | peak MiB | rel err | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_mem_bytes")
        lines.append(f"| {r['case']} | {r['impl']} | {_fmt(r.get('ms'), '.1f')} | "
                     f"{_fmt(peak and peak / 2**20, '.0f')} | {_fmt(r.get('rel_err'), '.1e')} | {r['status']} |")
    return lines


def step_markdown(rows: list[dict]) -> list[str]:
    """trl_step.py's rows: per model and head, stock and patched TRL side by side."""
    lines = ["| model | head | stock ms/step | patched ms/step | speed-up | stock peak GiB | patched peak GiB "
             "| status |",
             "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["head"]) for r in rows):
        pair = {r["trl"]: r for r in rows if (r["model"], r["head"]) == key}
        stock, fast = pair.get("stock", {}), pair.get("patched", {})
        speedup = stock["ms"] / fast["ms"] if stock.get("ms") and fast.get("ms") else None
        status = "; ".join(f"{name} {r['status']}" for name, r in pair.items() if r["status"] != "ok") or "ok"
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(stock.get('ms'), '.1f')} | {_fmt(fast.get('ms'), '.1f')} "
                     f"| {_fmt(speedup, '.2f')} | {_gib(stock.get('peak_bytes'))} | {_gib(fast.get('peak_bytes'))} "
                     f"| {status} |")
    return lines


def _gib(nbytes) -> str:
    return _fmt(nbytes and nbytes / 2**30, ".2f")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)
