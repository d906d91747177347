"""The efficiency benchmark's CPU smoke run produces well-formed outputs with the expected rows.

No timing assertions (CPU timings on a shared machine mean nothing); what is checked is the
structure of the JSON / markdown / plot, the rows (one per toy recipe, labelled by file stem), the
token counts of the synthetic clips (hand-computed here from the preprocessing rule) and the
kept-token counts each method realised (hand-computed from ``ceil(r * n)`` for the joint Top-K
methods, and equal to the schedule the reducer declares for the FLOP model for every method).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ep_kit_bench_efficiency", ROOT / "benchmarks" / "efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_benchmark()
    out = tmp_path_factory.mktemp("efficiency")
    paths = bench.main(["--smoke", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    return bench, paths


def test_smoke_writes_json_markdown_and_plot(smoke):
    _, paths = smoke
    assert {p.name for p in paths.values()} == {
        "efficiency_cpu_smoke.json", "efficiency_cpu_smoke.md", "efficiency_cpu_smoke.png",
    }
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    meta = result["meta"]
    for key in ("device", "torch", "transformers", "command", "model", "dtype", "timer"):
        assert meta[key], key
    assert meta["model"] == "tiny" and meta["dtype"] == "fp32" and meta["device"].startswith("CPU")
    assert "--smoke" in meta["command"]
    assert result["checks"] == []  # the targets are only checked on CUDA
    assert meta["complete"] is True
    md = paths["md"].read_text()
    assert "| method | end-to-end ms |" in md
    assert "517.1" in md and "32.0" in md  # the paper's full-model row side by side
    assert "Not checked" in md


def test_smoke_has_every_method_for_every_clip(smoke):
    bench, paths = smoke
    result = json.loads(paths["json"].read_text())
    baselines = sorted((ROOT / "recipes" / "toy" / "baselines").glob("*_20.yaml"))
    assert len(baselines) >= 5  # FastV, IntraModal, OmniZip, PyramidDrop, Random (+ any new one): each has a row
    expected = {"full", "cs2_ste_20", "cs2_ste_10", "cs2_ste_5", *(p.stem for p in baselines)}
    assert {Path(p).stem for p in bench.default_recipes(True, (20,))} == expected
    assert result["skipped"] == []
    for seconds in (2.0, 4.0):
        assert {r["method"] for r in result["rows"] if r["seconds"] == seconds} == expected
    # Each row names the recipe files it was built from, base first.
    recipes = result["meta"]["recipes"]
    assert recipes["fastv_20"] == ["recipes/toy/baselines/base.yaml", "recipes/toy/baselines/fastv_20.yaml"]
    assert recipes["cs2_ste_5"] == ["recipes/toy/cs2_ste_20.yaml", "recipes/toy/cs2_ste_5.yaml"]


def test_smoke_clips_have_the_preprocessing_token_counts(smoke):
    _, paths = smoke
    result = json.loads(paths["json"].read_text())
    for seconds, clip in result["clips"].items():
        s = float(seconds)
        frames = int(2 * s)  # 2 fps, even
        video = frames // 2 * (56 // 28) * (84 // 28)
        audio = int(25 * s)  # 100 mel frames/s -> 50 after the conv -> 25 after pooling
        assert (clip["video"], clip["audio"], clip["text"]) == (video, audio, 16 + 4)
        for row in (r for r in result["rows"] if r["seconds"] == s):
            assert row["tokens"] == video + audio + 20
            assert row["n_av"] == video + audio


def test_smoke_rows_are_well_formed_and_budgets_exact(smoke):
    _, paths = smoke
    result = json.loads(paths["json"].read_text())
    for row in result["rows"]:
        assert set(row["ms"]) == {"encoders", "sieve", "llm", "llm_stage", "end_to_end"}
        assert all(math.isfinite(v) and v >= 0 for v in row["ms"].values())
        assert row["ms"]["end_to_end"] > 0
        assert row["peak_gib"] is None and row["memory_reduction"] is None  # n/a on CPU
        assert len(row["tokens_per_layer"]) == 8
        n = row["n_av"]
        # What ran is what the FLOP model counts: the reducer's own per-layer schedule.
        assert [round(t) for t in row["tokens_per_layer"]] == row["tokens_per_layer_analytic"], row["method"]
        assert row["kept_av"] == row["tokens_per_layer_analytic"][-1] - 20
        if row["kind"] == "full":
            assert row["speedup"]["end_to_end"] == 1.0
            assert row["ideal_speedup"] == {"llm": 1.0, "end_to_end": 1.0}
            assert row["kept_av"] == n and row["paper_ms"] == 517.1
        else:
            assert row["ideal_speedup"]["llm"] > 1.0
        if row["kind"] in ("CS2", "FastV", "RandomReducer", "OmniZip"):
            assert row["kept_av"] == math.ceil(row["keep_ratio"] * n - 1e-9)
        if row["kind"] == "CS2":
            assert row["sieve_layers"] == 2 and row["ms"]["sieve"] > 0 and row["paper_gb"] is not None
        else:
            assert row["sieve_layers"] == 0


def test_cli_rejects_missing_recipes_and_recipes_without_a_reducer(tmp_path, capsys):
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--methods", "recipes/toy/baselines/sparse_20.yaml"])
    assert "sparse_20.yaml does not exist" in capsys.readouterr().err
    paths = tmp_path / "paths.yaml"
    paths.write_text("model:\n  keep_ratio: 0.5\n")
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--methods", str(paths)])
    assert f"{paths}: no model.reducer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="appear more than once"):
        bench.load_methods(["recipes/toy/baselines/fastv_20.yaml", "recipes/toy/baselines/fastv_20.yaml"])


def test_real_size_clip_batch_has_the_counted_tokens():
    """The 3B benchmark's synthetic 224x420 clip carries exactly the token counts of the FLOP model."""
    import torch

    from ep_kit import flops
    from ep_kit.models.tiny import qwen_omni_3b_config

    bench = load_benchmark()
    cfg = qwen_omni_3b_config()
    counts = flops.token_counts(4)
    batch = bench.clip_batch(cfg, counts, 2.0, 128, 2, torch.device("cpu"))
    ids = batch["input_ids"]
    assert ids.shape == (2, counts["total"])
    assert int((ids[0] == cfg.video_token_id).sum()) == counts["video"] == 4 * 8 * 15
    assert int((ids[0] == cfg.audio_token_id).sum()) == counts["audio"] == 100
    assert batch["video_grid_thw"].tolist() == [[4, 16, 30]] * 2
    assert tuple(batch["input_features"].shape) == (2, 128, 400)
    assert "labels" not in batch


def _row(method, ratio, seconds, tokens, sieve, llm_stage, e2e, peak, ideal_llm=1.0, ideal_e2e=1.0):
    kind = "full" if method == "full" else "CS2"
    return {
        "kind": kind, "method": method, "keep_ratio": ratio, "seconds": seconds, "tokens": tokens,
        "sieve_layers": 4 if kind == "CS2" else 0,
        "ms": {"sieve": sieve, "llm": llm_stage - sieve, "llm_stage": llm_stage, "end_to_end": e2e},
        "peak_gib": peak, "ideal_speedup": {"llm": ideal_llm, "end_to_end": ideal_e2e},
        "paper_ms": None, "paper_gb": None,
    }


def test_target_checks_pass_and_fail_by_hand():
    """The GPU-only PASS/FAIL lines, on hand-made rows (N=4 sieve layers of 36)."""
    bench = load_benchmark()
    rows = [
        _row("full", 1.0, 30.0, 4000, 0.0, 360.0, 500.0, 20.0),
        _row("full", 1.0, 60.0, 8000, 0.0, 720.0, 1000.0, 34.0),
        _row("full", 1.0, 120.0, 16000, 0.0, 1440.0, 2000.0, 50.0),
        # sieve limit at 30 s: 4/36 * 360 * 1.1 = 44 ms; speed-ups 360/120 = 3.0 vs 0.9 * 3.2 = 2.88 -> PASS,
        # end to end 500/250 = 2.0 vs 0.9 * 2.5 = 2.25 -> FAIL.
        _row("cs2_ste_20", 0.2, 30.0, 4000, 40.0, 120.0, 250.0, 10.0, ideal_llm=3.2, ideal_e2e=2.5),
        # sieve 50 ms > 44 ms -> FAIL.
        _row("cs2_ste_10", 0.1, 30.0, 4000, 50.0, 100.0, 200.0, 9.0, ideal_llm=3.0, ideal_e2e=2.0),
    ]
    bench.add_relative(rows)
    assert rows[3]["speedup"]["llm_stage"] == pytest.approx(3.0)
    assert rows[3]["memory_reduction"] == pytest.approx(2.0)
    checks = bench.target_checks(rows, num_layers=36)
    status = {(c["check"].split(" ")[0], c["detail"].split(":")[0]): c["status"] for c in checks}
    assert status[("sieve", "cs2_ste_20 @ 30 s")] == "PASS"
    assert status[("sieve", "cs2_ste_10 @ 30 s")] == "FAIL"
    assert status[("llm_stage", "cs2_ste_20 @ 30 s")] == "PASS"
    assert status[("end_to_end", "cs2_ste_20 @ 30 s")] == "FAIL"
    # full: 20 / 34 / 50 GiB at 4k / 8k / 16k tokens; the chord predicts 30 at 8k -> 4/34 = 11.8% off -> FAIL.
    assert status[("peak", "full")] == "FAIL"
    assert status[("peak", "cs2_ste_20")] == "N/A"  # one clip length only
    assert status[("full", "120 s")] == "PASS"  # 50 GiB < 80
    rows[1]["peak_gib"] = 30.5  # 0.5/30.5 = 1.6% off the chord
    again = bench.target_checks(rows, num_layers=36)
    assert [c["status"] for c in again if c["detail"].startswith("full:")] == ["PASS"]


def test_real_recipes_run_what_the_flop_model_counts_at_real_depth(tmp_path, monkeypatch):
    """The GPU runs' recipes (recipes/, 36 decoder layers: FastV K=2, PyramidDrop stages 1/8/16 at the
    layer-averaged budget, CS2 with Sync-RoPE) on a narrow 36-layer thinker with the 3B head_dim: every
    row runs, and each decoder layer processes exactly the tokens the reducer's schedule declares."""
    from ep_kit.models.tiny import tiny_thinker_config

    bench = load_benchmark()
    config = tiny_thinker_config(hidden_size=64, num_layers=36, num_heads=2, num_kv_heads=1, head_dim=128,
                                 mrope_section=[16, 24, 24], vision_depth=1, audio_layers=1)
    monkeypatch.setattr(bench, "make_scale", lambda args: bench.Scale(config, 56, 84, 16))
    recipes = ["recipes/baselines/full.yaml", "recipes/cs2_ste_5.yaml", "recipes/baselines/fastv_5.yaml",
               "recipes/baselines/pyramiddrop_5.yaml"]
    args = bench.parse_args(["--model", "tiny", "--device", "cpu", "--seconds", "4", "--repeats", "1",
                             "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--methods", *recipes])
    result = bench.run(args, log=lambda line: None)
    assert result["skipped"] == [] and [r["method"] for r in result["rows"]] == [Path(r).stem for r in recipes]
    for row in result["rows"]:
        assert [round(t) for t in row["tokens_per_layer"]] == row["tokens_per_layer_analytic"], row["method"]
    by_name = {r["method"]: r for r in result["rows"]}
    assert by_name["cs2_ste_5"]["sieve_layers"] == 4
    assert by_name["pyramiddrop_5"]["effective_keep_ratio"] == pytest.approx(0.05, abs=0.01)
    assert by_name["cs2_ste_5"]["rope"].startswith("SyncRoPE") and by_name["full"]["rope"] == "model default (TMRoPE)"
