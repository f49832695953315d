"""Print the README table rows for recorded `finers-rt bench --json` results.

    python bench/summarize.py bench/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    ours, ref, agree = r["ours"], r.get("reference", {}), r.get("agreement", {})
    decode = []
    for stage in ("gse", "lpr"):
        if stage in ours["decode"]:
            d = ours["decode"][stage]
            ref_ms = ref.get("decode", {}).get(stage, {}).get("ms_per_token_p50")
            decode.append(f"{stage} {_f(d['ms_per_token_p50'], 1)} / {_f(ref_ms, 1)} "
                          f"({_f(d['floor_ms_per_token'], 2)}, {_f(d['vs_floor'], 1)}x)")
    overhead = ours["decode"].get("python_overhead_ms_per_token")
    fraction = ours["decode"].get("python_overhead_fraction")
    load = r["environment"]["load_average_start"][0]
    agreement = (f"GSE text {_f(agree.get('gse_text_equal'))}, tokens {_f(agree.get('gse_token_agreement'), 3)}; "
                 f"LPR tokens {_f(agree.get('probe_lpr_token_agreement'), 3)}; mask IoU min "
                 f"{_f(agree.get('mask_iou_min'), 3)} / {_f(agree.get('probe_mask_iou_min'), 3)}")
    return (f"| [{path.stem}]({path.name}) (load {load:.1f}, bw {r['bandwidth_gbs']:.1f} GB/s) | "
            f"{_f(r['speedup_e2e'])}x | {_f(r['speedup_repeat_query'])}x | "
            f"{'; '.join(decode)} | {_f(overhead)} ms ({_f(100 * fraction if fraction else None, 1)}%) | "
            f"{_f(ours['peak_rss_mb'], 0)} / {_f(ref.get('peak_rss_mb'), 0)} | {agreement} |")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(row(Path(name)))
