"""Aggregate the pulse study's run cache into JSON, a PNG and a markdown table (bench/pulse_study.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.pulse_study import FAMILIES, PULSES, SCOPES, best_adamw, cache_path, emo_spec, load_cache, summarize


def family_best(cache: dict, family: str, seeds: list[int]) -> tuple[str | None, float]:
    """The best fp32 scope-grid entry of a family over both reference pulses (v3.8, v3.9)."""
    best, value = None, math.inf
    for pulse in ("v3.8", "v3.9"):
        for scope in SCOPES:
            spec = emo_spec(family, pulse, "fp32", scope)
            row = summarize(cache, spec, seeds)
            if row is not None and row["test_loss_mean"] < value:
                best, value = spec, row["test_loss_mean"]
    return best, value


def report(task: str, seeds: list[int], out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    cache = load_cache(cache_path(task, out))
    specs = list(dict.fromkeys(spec for spec, _ in cache))
    rows = {spec: summarize(cache, spec, seeds) for spec in specs}
    rows = {k: v for k, v in rows.items() if v is not None}
    adam = best_adamw(cache, task, seeds)
    adam_loss = rows[adam]["test_loss_mean"] if adam else math.nan
    fam_best = {f: family_best(cache, f, seeds) for f in FAMILIES}
    for spec, row in rows.items():
        row["vs_best_adamw"] = row["test_loss_mean"] / adam_loss
        fam = spec.split()[0]
        if fam in fam_best and fam_best[fam][0] is not None:
            row["vs_family_best_scope"] = row["test_loss_mean"] / fam_best[fam][1]
    summary = {"task": task, "seeds": seeds, "best_adamw": adam,
               "family_best_scope": {f: {"spec": s, "test_loss_mean": v} for f, (s, v) in fam_best.items()},
               "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pulse_{task}.json").write_text(json.dumps(summary, indent=1) + "\n")
    if seeds:
        shown = [adam] if adam else []
        shown += ["Prodigy"] + [emo_spec(f, p) for f in FAMILIES for p in PULSES]
        runs = [(s, cache[(s, seeds[0])]) for s in shown if (s, seeds[0]) in cache]
        if not runs:
            print(f"(no plot: none of the plotted optimizers has a run with seed {seeds[0]} in the cache)")
        else:
            try:
                plot(runs, out / f"pulse_{task}.png",
                     f"{task}: seed {seeds[0]}, every Emo family at lr=1.0 with each pulse")
            except ImportError:
                pass
    print(markdown(summary))
    print()
    print(family_table(summary))
    return summary


def fmt_row(spec: str, row: dict[str, Any]) -> str:
    spread = f"{row['test_loss_min']:.4f}–{row['test_loss_max']:.4f}"
    div = ", ".join(map(str, row["diverged_seeds"])) or ""
    fam = row.get("vs_family_best_scope")
    return (f"| {spec} | {row['test_loss_mean']:.4f} | {spread} | {row['vs_best_adamw']:.3f} | "
            f"{'' if fam is None else f'{fam:.3f}'} | {row['final_eta_mean']:.3g} | {div} |")


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"task {summary['task']}, seeds {summary['seeds']}; best AdamW: {summary['best_adamw']}",
             "| optimizer | held-out loss (mean) | min–max over seeds | / best AdamW | / family's best scope | "
             "final η | diverged seeds |", "|---|---|---|---|---|---|---|"]
    for spec, row in summary["results"].items():
        lines.append(fmt_row(spec, row))
    return "\n".join(lines)


def family_table(summary: dict[str, Any]) -> str:
    """One row per family at ``lr=1.0``: each pulse (fp32; adaptive also 8bit) against the best
    AdamW and the family's own best scope; the Done-when ratios of issue 7."""
    res, adam = summary["results"], summary["best_adamw"]
    lines = [f"| family | v3.8 | v3.9 | adaptive | adaptive 8bit | best scope (pulse, scope): loss | "
             f"adaptive / best scope | adaptive / {adam} |", "|---|---|---|---|---|---|---|---|"]

    def cell(spec: str) -> str:
        row = res.get(spec)
        if row is None:
            return "–"
        div = f" ({len(row['diverged_seeds'])} diverged)" if row["diverged_seeds"] else ""
        return f"{row['test_loss_mean']:.4f}{div}"

    for fam in FAMILIES:
        best = summary["family_best_scope"][fam]
        ada = res.get(emo_spec(fam, "adaptive"))
        where = " ".join(best["spec"].split()[2:]) if best["spec"] else "–"
        ratios = (f"{ada['vs_family_best_scope']:.3f} | {ada['vs_best_adamw']:.3f}" if ada and best["spec"]
                  else "– | –")
        lines.append(f"| {fam} | {cell(emo_spec(fam, 'v3.8'))} | {cell(emo_spec(fam, 'v3.9'))} | "
                     f"{cell(emo_spec(fam, 'adaptive'))} | {cell(emo_spec(fam, 'adaptive', '8bit'))} | "
                     f"{where}: {best['test_loss_mean']:.4f} | {ratios} |")
    peers = [k for k in res if not k.startswith("Emo") and not k.startswith("AdamW")] + [adam]
    lines.append("")
    lines.append("| peer | held-out loss |")
    lines.append("|---|---|")
    lines += [f"| {k} | {res[k]['test_loss_mean']:.4f} |" for k in peers if k in res]
    return "\n".join(lines)


__all__ = ["report", "markdown", "family_best", "family_table", "PULSES"]


def plot(runs: list[tuple[str, dict]], path: Path, title: str) -> None:
    """Loss (smoothed) and step size per step of ``runs`` (spec, cached run; at least one, all of
    one task and seed): two stacked panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eta) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    window = max(1, min(20, len(runs[0][1]["curve"]) // 10))  # the runs of a task share their step count
    for spec, run in runs:
        curve = run["curve"]
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
                  for i in range(len(curve))]
        style = dict(lw=1.8 if "adaptive" in spec else 1.0, ls="-" if spec.startswith("Emo") else "--")
        ax_loss.plot(smooth, label=spec, **style)
        ax_eta.plot(run["etas"], label=spec, **style)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel(f"train loss ({window}-step mean)")
    ax_eta.set_yscale("log")
    ax_eta.set_ylabel("step size η (Prodigy: d·lr)")
    ax_eta.set_xlabel("step")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
