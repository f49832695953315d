"""finers-rt bench: statistics helpers, options, torch-free import, end to end with the reference."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from finers_rt import bench
from finers_rt.errors import InputError

# ---- statistics and agreement helpers ----------------------------------------------------------


def test_summarize_known_values():
    stats = bench.summarize(list(range(1, 11)))
    assert stats == {"p50": 5.5, "p90": pytest.approx(9.1), "max": 10.0, "mean": 5.5, "n": 10}
    assert bench.summarize([7.0]) == {"p50": 7.0, "p90": 7.0, "max": 7.0, "mean": 7.0, "n": 1}
    assert bench.summarize([]) == {"n": 0}
    skewed = bench.summarize([1, 1, 1, 1, 100])
    assert skewed["p50"] == 1.0 and skewed["max"] == 100.0 and skewed["p90"] == pytest.approx(60.4)


def test_summarize_records_skips_absent_stages_and_sums_tokens():
    records = [{"timings": {"total_ms": 10.0, "gse_decode_ms": 100.0, "gse_tokens": 10}},
               {"timings": {"total_ms": 30.0, "gse_decode_ms": 300.0, "gse_tokens": 50,
                            "sam_encoder_ms": 5.0}}]
    out = bench.summarize_records(records)
    assert out["stages"]["total_ms"]["p50"] == 20.0
    assert out["stages"]["sam_encoder_ms"]["n"] == 1
    assert "lpr_decode_ms" not in out["stages"]
    assert out["gse_tok_per_s"] == pytest.approx(1000.0 * 60 / 400)
    assert "lpr_tok_per_s" not in out


def test_mask_iou_and_token_agreement():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert bench.mask_iou(a, b) == 1.0  # both empty: the official convention
    a[:2] = True
    b[1:3] = True
    assert bench.mask_iou(a, b) == pytest.approx(4 / 12)
    assert bench.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # diverged at step 3
    assert bench.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert bench.token_agreement([], []) == 1.0


def test_prefix_agreement_counts_reference_tokens_followed():
    vocab = {1: "ab", 2: "c", 3: "d", 4: "e"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert bench.prefix_agreement([1, 2, 3], "abcd", decode) == 1.0
    assert bench.prefix_agreement([1, 2, 3, 4], "abcx", decode) == 0.5
    assert bench.prefix_agreement([2, 3], "abcd", decode) == 0.0
    assert bench.prefix_agreement([], "", decode) == 1.0


def test_ratios_and_speedup_definition():
    def side(total, rest):
        stage = {"total_ms": {"p50": total}}
        return {"single": {"stages": stage}, "repeat_first": {"stages": stage},
                "repeat_rest": {"stages": {"total_ms": {"p50": rest}}}, "stages": {"stages": {}},
                "batch": {"images_per_s": 2.0}}

    out = bench.ratios(side(10.0, 1.0), side(50.0, 40.0))
    assert out["single"]["total_ms"] == 5.0 and out["repeat_rest"]["total_ms"] == 40.0
    assert out["batch_images_per_s"] == 1.0


@pytest.mark.parametrize("kwargs,needle", [
    ({"queries_per_image": 1}, "queries_per_image must be >= 2"),
    ({"iters": 0}, "iters must be >= 1"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"attn": "flash"}, "attn must be auto, sdpa or eager"),
    ({"image_size_wh": (10, 10)}, "image size must be >= 28x28"),
])
def test_bad_options(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        bench.BenchOptions(**kwargs)


def test_machine_helpers():
    assert bench.measure_bandwidth(nbytes=8 << 20, repeats=2) > 0.01
    assert bench.measure_bandwidth(nbytes=8 << 20, repeats=2, kind="copy") > 0.01
    with pytest.raises(InputError, match="read' or 'copy"):
        bench.measure_bandwidth(nbytes=8 << 20, kind="triad")
    if bench.reset_peak_rss():
        assert bench.peak_rss_mb() > 1.0


def test_centre_probe_is_inside_the_crop():
    spec = bench.centre_probe((3840, 2160), 512)
    x1, y1, x2, y2 = spec["crop_xyxy"]
    assert (x2 - x1, y2 - y1) == (512, 512) and x1 < 1920 < x2
    bx1, by1, bx2, by2 = spec["box_xyxy"]
    assert 0 <= bx1 < bx2 <= 512 and all(bx1 <= px <= bx2 and by1 <= py <= by2
                                         for px, py in spec["points_xy"])


def test_bench_modules_are_torch_free():
    code = ("import sys, finers_rt.bench, finers_rt.bench_run, finers_rt.bench_report, finers_rt.cli; "
            "bad = [m for m in ('torch', 'transformers', 'segment_anything') if m in sys.modules]; "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---- end to end on a tiny bundle, with the reference ----------------------------------------

# `tiny_bundle` is the shared session fixture of tests/conftest.py.


def test_bench_cli_reference_end_to_end(tiny_bundle, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finers_rt.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--model", str(tiny_bundle), "--reference", "--iters", "1", "--warmup", "0",
            "--queries-per-image", "2", "--batch", "1", "--image-size", "640x360",
            "--max-new-tokens", "6", "--threads", "1", "--attn", "sdpa",
            "--json", str(out_json), "--plot", str(out_png)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "speedup e2e" in run.output
    data = json.loads(out_json.read_text())
    for key in ("speedup_e2e", "speedup_repeat_query", "ours", "reference", "agreement",
                "environment", "floors", "bandwidth_gbs", "ratios_p50"):
        assert key in data, key
    assert data["speedup_e2e"] > 0 and data["speedup_repeat_query"] > 0
    for side in ("ours", "reference"):
        stages = data[side]["single"]["stages"]
        assert stages["total_ms"]["n"] == 1 and stages["gse_decode_ms"]["p50"] > 0
        assert data[side]["repeat_rest"]["stages"]["total_ms"]["n"] == 1
        assert data[side]["stages"]["stages"]["sam_encoder_ms"]["n"] == 1
        assert data[side]["peak_rss_mb"] is None or data[side]["peak_rss_mb"] > 0
    # Same checkpoints, same greedy decoding: the outputs must agree.
    agree = data["agreement"]
    assert agree["queries"] == 3
    assert agree["gse_text_equal"] == 1.0 and agree["gse_token_agreement"] == 1.0
    assert agree["probe_lpr_token_agreement"] == 1.0
    assert agree["probe_mask_iou_min"] > 0.95 and agree["mask_iou_min"] > 0.95
    # The 2nd question reuses the runtime's prefix cache: no vision pass.
    assert data["ours"]["repeat_rest"]["stages"]["gse_vision_ms"]["max"] == 0.0
    assert data["reference"]["repeat_rest"]["stages"]["gse_vision_ms"]["p50"] > 0.0
    env = data["environment"]
    assert env["onnxruntime"] and env["torch"] and "load_average_start" in env
    assert data["command"].startswith("finers-rt bench")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_bad_model_is_a_clean_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "finers_rt.cli", "bench", "--model", str(tmp_path),
                          "--iters", "1", "--warmup", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr


def test_decode_report_floor_and_python_overhead():
    from finers_rt.bench_run import decode_report, normalize_timings

    records = [{"timings": {"gse_decode_ms": 100.0, "gse_tokens": 10}, "decode_session_ms": 90.0},
               {"timings": {"gse_decode_ms": 300.0, "gse_tokens": 10, "lpr_decode_ms": 50.0,
                            "lpr_tokens": 5}, "decode_session_ms": 320.0}]
    out = decode_report(records, {"gse": {"floor_ms_per_token": 5.0}, "lpr": {"floor_ms_per_token": 2.0}})
    assert out["gse"]["ms_per_token_p50"] == 20.0 and out["gse"]["vs_floor"] == 4.0
    assert out["lpr"]["ms_per_token_p50"] == 10.0
    assert out["python_overhead_ms_per_token"] == pytest.approx(40.0 / 25)
    assert out["python_overhead_fraction"] == pytest.approx(40.0 / 450)
    merged = normalize_timings({"gse_prefix_prefill_ms": 5.0, "gse_question_prefill_ms": 2.0,
                                "gse_total_ms": 99.0, "total_ms": 10.0})
    assert merged == {"gse_prefill_ms": 7.0, "total_ms": 10.0}


def test_reference_keeps_the_last_decoded_frame(tmp_path):
    """The repeat scenario's rule on the reference side: one decode per unchanged file."""
    import os

    from PIL import Image

    pytest.importorskip("torch")
    from finers_rt.config import PipelineConfig
    from finers_rt.export.reference import ReferencePipeline

    path = tmp_path / "frame.png"
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(path)
    ref = ReferencePipeline(PipelineConfig(), None, None, None)
    first = ref._open(path)
    assert ref._open(str(path)) is first and first.mode == "RGB" and first.size == (40, 30)
    Image.fromarray(np.full((30, 40, 3), 9, np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    again = ref._open(path)
    assert again is not first and np.asarray(again)[0, 0, 0] == 9


def test_session_time_counts_wrapped_runs_and_bound_shared_kv_steps():
    """Python overhead = decode - session: session must include steps that bypass decoder.run."""
    from types import SimpleNamespace

    from finers_rt.bench_run import RuntimeSide

    class Decoder:
        def run(self, feeds, output_names=None):
            return {"logits": np.zeros((1, 4), np.float32)}

    pipe = SimpleNamespace(config=SimpleNamespace(max_new_tokens=8),
                           gse=SimpleNamespace(decoder=Decoder(), decode_session_ms=0.0),
                           lpr=SimpleNamespace(decoder=Decoder()))  # an older stage: no counter
    side = RuntimeSide(pipe, None)
    assert side._session_ms() == 0.0
    pipe.lpr.decoder.run({"inputs_embeds": np.zeros((1, 1, 4), np.float32)})  # a decode step
    pipe.lpr.decoder.run({"inputs_embeds": np.zeros((1, 7, 4), np.float32)})  # a prefill: not counted
    assert side.timers["lpr"].decode_calls == 1
    wrapped = side.timers["lpr"].decode_ms
    pipe.gse.decode_session_ms = 5.0  # steps run through the shared-KV binding
    assert side._session_ms() == pytest.approx(wrapped + 5.0)


def test_genai_peer_without_genai_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is not None:
        pytest.skip("onnxruntime_genai is installed here")
    from finers_rt.bench_genai import import_genai
    from finers_rt.errors import InputError

    with pytest.raises(InputError, match="pip install onnxruntime-genai"):
        import_genai()
