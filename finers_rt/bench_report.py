"""Human views of a `finers-rt bench` record: rich tables and a matplotlib PNG (lazy imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finers_rt.bench import STAGES

_SCENARIOS = (("single", "one question / image"), ("repeat_first", "repeat: 1st question"),
              ("repeat_rest", "repeat: 2nd..Kth"), ("stages", "fixed-crop LPR + SAM"))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_tables(result: dict[str, Any]) -> list:
    """One rich Table per scenario (p50 / p90 / max ms per stage, both sides, ratio) + a summary."""
    from rich.table import Table

    ours, ref = result["ours"], result.get("reference")
    tables = []
    for key, title in _SCENARIOS:
        table = Table(title=f"{title} (ms)")
        table.add_column("stage")
        for col in ("ours p50", "p90", "max") + (("ref p50", "p90", "max", "ref/ours") if ref else ()):
            table.add_column(col, justify="right")
        for stage in STAGES:
            a = ours[key]["stages"].get(stage)
            b = ref[key]["stages"].get(stage) if ref else None
            if a is None and b is None:
                continue
            row = [stage.removesuffix("_ms")] + [_fmt(a and a[s]) for s in ("p50", "p90", "max")]
            if ref:
                ratio = result["ratios_p50"][key].get(stage)
                row += [_fmt(b and b[s]) for s in ("p50", "p90", "max")] + [_fmt(ratio, 2) + "x" if ratio else "-"]
            table.add_row(*row)
        tables.append(table)
    tables.append(_summary_table(result))
    return tables


def _summary_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    ours, ref = result["ours"], result.get("reference")
    table = Table(title=f"summary: {result['model']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("speedup e2e (ref / ours, one question)", _fmt(result["speedup_e2e"], 2)),
            ("speedup repeat question (2nd..Kth)", _fmt(result["speedup_repeat_query"], 2)),
            ("ours peak RSS MiB", _fmt(ours["peak_rss_mb"], 0)),
            ("ours batch images/s", _fmt(ours["batch"]["images_per_s"], 3)),
            ("memory bandwidth GB/s, 1 thread: read (floor) / copy",
             f"{_fmt(result['bandwidth_gbs'], 1)} / {_fmt(result.get('bandwidth_copy_gbs'), 1)}")]
    for stage in ("gse", "lpr"):
        d = ours["decode"].get(stage)
        if d:
            rows.append((f"ours {stage} decode ms/token (floor)",
                         f"{_fmt(d['ms_per_token_p50'], 2)} ({_fmt(d['floor_ms_per_token'], 3)}, "
                         f"{_fmt(d['vs_floor'], 1)}x)"))
    if "python_overhead_fraction" in ours["decode"]:
        rows.append(("ours Python overhead / decode step",
                     f"{_fmt(ours['decode']['python_overhead_ms_per_token'], 2)} ms "
                     f"({100 * ours['decode']['python_overhead_fraction']:.1f}%)"))
    if ref:
        agree = result["agreement"]
        rows += [("ref peak RSS MiB", _fmt(ref["peak_rss_mb"], 0)),
                 ("ref attention", ref["attn_implementation"]),
                 ("GSE text equal / token agreement",
                  f"{agree['gse_text_equal']:.2f} / {agree['gse_token_agreement']:.3f}"),
                 ("LPR token agreement (fixed crop)", _fmt(agree["probe_lpr_token_agreement"], 3)),
                 ("mask IoU mean / min (e2e)", f"{agree['mask_iou_mean']:.3f} / {agree['mask_iou_min']:.3f}"),
                 ("mask IoU mean / min (fixed crop)",
                  f"{agree['probe_mask_iou_mean']:.3f} / {agree['probe_mask_iou_min']:.3f}")]
    rows.append(("load average (1 min) start / end",
                 f"{result['environment']['load_average_start'][0]:.1f} / "
                 f"{result['environment'].get('load_average_end', [float('nan')])[0]:.1f}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def write_plot(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG: per-stage p50 ms (log scale) of both sides for the single and repeat scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sides = [("finers-rt", result["ours"])]
    if result.get("reference"):
        sides.append((f"reference ({result['reference']['attn_implementation']})", result["reference"]))
    panels = [("single", "one question per image"), ("repeat_rest", "2nd..Kth question, same image"),
              ("stages", "fixed-crop LPR + SAM")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    for ax, (key, title) in zip(axes, panels):
        stages = [s for s in STAGES if any(s in side[key]["stages"] for _, side in sides)]
        x = np.arange(len(stages))
        width = 0.8 / len(sides)
        for i, (label, side) in enumerate(sides):
            values = [side[key]["stages"].get(s, {}).get("p50", 0.0) for s in stages]
            ax.bar(x + i * width, values, width, label=label)
        ax.set_xticks(x + width * (len(sides) - 1) / 2)
        ax.set_xticklabels([s.removesuffix("_ms") for s in stages], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("p50 ms (log)")
        ax.set_title(title)
        ax.legend()
    speed = result.get("speedup_e2e")
    fig.suptitle(f"{result['model']}: e2e speedup {_fmt(speed, 2)}x, repeat question "
                 f"{_fmt(result.get('speedup_repeat_query'), 2)}x (p50, {result['options']['iters']} iters)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
