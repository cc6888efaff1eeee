"""Write a report as JSON (everything), CSV (one row per candidate and mode) and Markdown."""

from __future__ import annotations

import csv
import json
import os

COLUMNS = [
    "op", "case", "dtype", "candidate", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mib",
    "speedup_vs_reference", "speedup_vs_strongest", "memory_vs_reference", "out_rel_err", "status",
]


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _cell(text: str) -> str:
    """A table cell: a failure message's "|diff|" must not split the Markdown row."""
    return str(text).replace("|", "\\|")


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# fastctx benchmark: {meta['device']}",
        "",
        f"{meta['date']} · torch {meta['torch']} · CUDA {meta['cuda']} · triton {meta['triton']} · "
        f"fastctx {meta['fastctx']} ({meta['commit']}) · NaN checks {meta['nan_checks']}",
        "",
        "Times are medians (20th-80th percentile in brackets) of one call, in ms"
        + (f" ({meta['timed_calls']})" if meta.get("timed_calls") else "")
        + "; peak is the memory "
        f"a call adds above its inputs, in MiB: {meta.get('peak_memory', 'see fastctx/bench/measure.py')}; "
        "ratios are against candidates of this same run. "
        "A candidate whose output or gradients disagree with the float64 reference is reported as "
        "failed and not timed.",
        "",
    ]
    run, total = meta.get("cases_run"), meta.get("cases_total")
    if run is not None and run < total:
        lines += [f"**Partial report: {run} of {total} cases (case x dtype) run so far; the run was cut "
                  "short or is still going.**", ""]
    keys = []
    for r in report["rows"]:
        if (r["op"], r["case"], r["dtype"]) not in keys:
            keys.append((r["op"], r["case"], r["dtype"]))
    for op, case, dtype in keys:
        rows = [r for r in report["rows"] if (r["op"], r["case"], r["dtype"]) == (op, case, dtype)]
        lines += [f"## {op} {case} {dtype}", ""]
        lines += [
            "| candidate | fwd ms | bwd ms | fwd+bwd ms | x ref (fwd+bwd) | x strongest (fwd+bwd) | peak fwd MiB | peak fwd+bwd MiB | mem x ref |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        cands = []
        for r in rows:
            if r["candidate"] not in cands:
                cands.append(r["candidate"])
        for c in cands:
            mine = {r["mode"]: r for r in rows if r["candidate"] == c}
            if "-" in mine:
                lines.append(f"| {c} | {_cell(mine['-']['status'])} | | | | | | | |")
                continue
            t = lambda m: f"{_fmt(mine[m]['median_ms'])} ({_fmt(mine[m]['p20_ms'])}-{_fmt(mine[m]['p80_ms'])})"  # noqa: E731
            fb = mine["fwd+bwd"]
            lines.append(
                f"| {c} | {t('fwd')} | {t('bwd')} | {t('fwd+bwd')} | {_fmt(fb['speedup_vs_reference'], 2)} | "
                f"{_fmt(fb['speedup_vs_strongest'], 2)} | {_fmt(mine['fwd']['peak_mib'], 1)} | "
                f"{_fmt(fb['peak_mib'], 1)} | {_fmt(fb['memory_vs_reference'], 2)} |"
            )
        lines.append("")
    if report["targets"]:
        lines += ["## Targets", "", "| target | case | dtype | result | figure |", "|---|---|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {t['case']} | {t['dtype']} | **{t['result']}** | {_cell(t['detail'])} |")
        lines.append("")
    return "\n".join(lines)


def write(report: dict, out_dir: str) -> dict[str, str]:
    """Write ``report.json``, ``report.csv`` and ``report.md`` under ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "csv", "md")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "device", "torch", "triton", "commit"] + COLUMNS + ["config"])
        m = report["meta"]
        for r in report["rows"]:
            w.writerow([m["date"], m["device"], m["torch"], m["triton"], m["commit"]] + [r.get(c) for c in COLUMNS] + [json.dumps(r["config"])])
    with open(paths["md"], "w") as f:
        f.write(markdown(report))
    return paths
