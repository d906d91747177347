"""The efficiency benchmark's CPU smoke run produces well-formed outputs with the expected rows.

No timing assertions (CPU timings on a shared machine mean nothing); what is checked is the
structure of the JSON / markdown / plot, the rows (every main-table row, labelled by file stem), the
round-robin timing order, the token counts of the synthetic clips (hand-computed here from the
preprocessing rule), the kept-token counts each method realised (hand-computed from ``ceil(r * n)``
for the joint Top-K methods, and equal to the schedule the reducer declares for the FLOP model for
every method), the FLOP-efficiency targets and sieve shares on hand-made rows, the default output
folder, the paper's FLOP ceilings, and the memory probes (one fresh process per row and clip).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    return load_script("efficiency")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_benchmark()
    out = tmp_path_factory.mktemp("efficiency")
    paths = bench.main(["--smoke", "--repeats", "2", "--memory", "skip", "--out", str(out)])
    return bench, paths


def load_main_table():
    return load_script("main_table")


def test_smoke_writes_json_markdown_and_plot(smoke):
    _, paths = smoke
    assert {p.name for p in paths.values()} == {
        "efficiency_cpu_smoke.json", "efficiency_cpu_smoke.md", "efficiency_cpu_smoke.png",
    }
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    meta = result["meta"]
    for key in ("device", "torch", "transformers", "command", "commit", "model", "dtype", "timer"):
        assert meta[key], key
    assert meta["model"] == "tiny" and meta["dtype"] == "fp32" and meta["device"].startswith("CPU")
    assert meta["command"].startswith("python benchmarks/efficiency.py --smoke")
    assert meta["complete"] is True and meta["warmup"] == 1 and meta["repeats"] == 2
    # On CPU the FLOP-efficiency targets are reported, never judged.
    assert result["checks"] and {c["status"] for c in result["checks"]} == {"INFO"}
    md = paths["md"].read_text()
    assert f"Commit: `{meta['commit']}`" in md
    assert "| method | encoders | sieve |" in md and "Informational (CPU)" in md
    assert "shared, noisy machine" in md
    assert "517.1" in md and "32.0" in md  # the paper's numbers beside the FLOP ceiling
    assert "does not state the clip length" in md
    assert "## Memory" in md and "Not measured in this run." in md  # --memory skip


def test_smoke_default_is_every_main_table_row_at_every_budget(smoke):
    """The smoke and the GPU run measure every row of the main table: full, EchoingPixels and every
    training-free baseline the main table discovers, at each of its budgets (20/10/5%)."""
    bench, paths = smoke
    result = json.loads(paths["json"].read_text())
    table = load_main_table()
    assert bench.BUDGETS == (20, 10, 5)
    for toy, folder in ((True, "toy"), (False, "real")):
        keys = table.baseline_files(ROOT / table.SCALES[folder]["rows"]).values()
        assert len(keys) >= 5  # FastV, IntraModal, OmniZip, PyramidDrop, Random (+ any new one)
        expected = {"full", *(f"cs2_ste_{p}" for p in bench.BUDGETS), *(f"{k}_{p}" for k in keys for p in bench.BUDGETS)}
        assert {Path(p).stem for p in bench.default_recipes(toy)} == expected
    toy_expected = {Path(p).stem for p in bench.default_recipes(True)}
    assert set(result["meta"]["recipes"]) == toy_expected
    assert result["skipped"] == []
    for seconds in (2.0, 4.0):
        assert {r["method"] for r in result["rows"] if r["seconds"] == seconds} == toy_expected
    # Each row names the recipe files it was built from, base first.
    recipes = result["meta"]["recipes"]
    assert recipes["fastv_20"] == ["recipes/toy/baselines/base.yaml", "recipes/toy/baselines/fastv_20.yaml"]
    assert recipes["cs2_ste_5"] == ["recipes/toy/cs2_ste_20.yaml", "recipes/toy/cs2_ste_5.yaml"]


def test_smoke_times_the_methods_round_robin(smoke):
    """Every clip's rounds are the seeded shuffles of every method, and each row has one sample per round."""
    bench, paths = smoke
    result = json.loads(paths["json"].read_text())
    names = list(result["meta"]["recipes"])
    assert set(result["orders"]) == {"2.0", "4.0"}
    for rounds in result["orders"].values():
        assert rounds == bench.interleaved_order(names, 2, seed=0)
        assert all(sorted(r) == sorted(names) for r in rounds)
    for row in result["rows"]:
        assert all(len(v) == 2 for v in row["ms_samples"].values())


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
        assert set(row["ms"]) == set(row["ms_range"]) == {"encoders", "sieve", "llm", "llm_stage", "end_to_end"}
        assert all(math.isfinite(v) and v >= 0 for v in row["ms"].values())
        for stage, (lo, hi) in row["ms_range"].items():  # median within [min, max] of the samples
            assert lo == min(row["ms_samples"][stage]) <= row["ms"][stage] <= hi == max(row["ms_samples"][stage])
        assert row["ms"]["end_to_end"] > 0
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
            assert row["flop_efficiency"]["end_to_end"] == pytest.approx(
                row["speedup"]["end_to_end"] / row["ideal_speedup"]["end_to_end"])
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
    with pytest.raises(SystemExit):  # no cold runs: every method is warmed up before timing
        bench.parse_args(["--smoke", "--warmup", "0", "--methods", "recipes/toy/baselines/full.yaml"])
    assert "--warmup >= 1" in capsys.readouterr().err


def test_default_output_is_outside_the_recorded_results(tmp_path):
    bench = load_benchmark()
    full = ["--methods", "recipes/toy/baselines/full.yaml"]
    for argv in (["--smoke", *full], ["--model", "tiny", "--device", "cpu", *full]):
        out = bench.parse_args(argv).out
        assert out == ROOT / "runs" / "efficiency" == bench.DEFAULT_OUT
        assert ROOT / "benchmarks" / "results" not in (out, *out.parents)
    assert bench.parse_args(["--smoke", *full, "--out", str(tmp_path)]).out == tmp_path


def test_interleaved_order_is_a_seeded_shuffle_of_every_method_per_round():
    bench = load_benchmark()
    names = [f"m{i}" for i in range(8)]
    rounds = bench.interleaved_order(names, 6, seed=0)
    assert len(rounds) == 6 and all(sorted(r) == names for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert rounds == bench.interleaved_order(names, 6, seed=0)  # and is reproducible
    assert rounds != bench.interleaved_order(names, 6, seed=1)


def test_time_methods_warms_every_method_up_then_times_round_robin(monkeypatch):
    """The call sequence: ``warmup`` runs of every method first, then each round in its shuffled order."""
    import torch

    bench = load_benchmark()
    calls = []

    def fake_prefill(model, batch, clock, logits):
        calls.append(model)
        return [1.0, 2.0, float(len(calls))], None

    monkeypatch.setattr(bench, "timed_prefill", fake_prefill)
    monkeypatch.setattr(bench, "prefill_info", lambda model, p: {"model": model})
    models = {name: name for name in ("a", "b", "c", "d")}
    samples, info, orders = bench.time_methods(models, {}, torch.device("cpu"), warmup=2, repeats=3, logits="last", seed=5)
    assert calls[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert orders == bench.interleaved_order(list(models), 3, seed=5)
    assert calls[8:] == [name for order in orders for name in order]
    assert info == {name: {"model": name} for name in models}
    # The llm-stage sample of each run is its place in the call sequence, per method in round order.
    for name in models:
        at = [8 + i + 1 for i, n in enumerate(calls[8:]) if n == name]
        assert samples[name]["llm"] == at
        assert samples[name]["llm_stage"] == [2.0 + t for t in at] and samples[name]["end_to_end"] == [3.0 + t for t in at]
    with pytest.raises(ValueError, match="warmup"):
        bench.time_methods(models, {}, torch.device("cpu"), warmup=0, repeats=1, logits="last")


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
    train = bench.clip_batch(cfg, counts, 2.0, 128, 1, torch.device("cpu"), answer_tokens=16)
    assert train["input_ids"].shape == (1, counts["total"] + 16)
    assert int((train["labels"] != -100).sum()) == 16  # labels on the answer only


def _row(method, ratio, seconds, sieve, llm_stage, e2e, ideal_llm=1.0, ideal_e2e=1.0, flops=None):
    kind = "full" if method == "full" else "CS2"
    return {
        "kind": kind, "method": method, "keep_ratio": ratio, "seconds": seconds, "tokens_per_layer": [0] * 36,
        "sieve_layers": 4 if kind == "CS2" else 0,
        "ms": {"sieve": sieve, "llm": llm_stage - sieve, "llm_stage": llm_stage, "end_to_end": e2e},
        "ideal_speedup": {"llm": ideal_llm, "end_to_end": ideal_e2e},
        "flops_tera": flops or {"sieve": 4.5, "llm_stage": 11.25, "end_to_end": 35.25},
        "paper_ms": None, "paper_gb": None,
    }


def test_flop_efficiency_targets_by_hand():
    """Efficiency = achieved / FLOP-ideal speed-up per stage; PASS at >= 0.9 on CUDA, INFO (same ratios) on CPU."""
    bench = load_benchmark()
    full_flops = {"sieve": 0.0, "llm_stage": 36.0, "end_to_end": 60.0}
    rows = [
        _row("full", 1.0, 30.0, 0.0, 360.0, 500.0, flops=full_flops),
        # LLM stage 360/120 = 3.0x of 3.2x ideal -> 0.9375 PASS; end to end 500/250 = 2.0x of 2.5x -> 0.8 FAIL.
        _row("cs2_ste_20", 0.2, 30.0, 40.0, 120.0, 250.0, ideal_llm=3.2, ideal_e2e=2.5,
             flops={"sieve": 4.5, "llm_stage": 11.25, "end_to_end": 35.25}),
        # LLM stage 360/100 = 3.6x of 3.75x -> 0.96 PASS; end to end 500/200 = 2.5x of 2.6x -> 0.9615 PASS.
        _row("cs2_ste_10", 0.1, 30.0, 50.0, 100.0, 200.0, ideal_llm=3.75, ideal_e2e=2.6),
        _row("cs2_ste_5", 0.05, 60.0, 50.0, 100.0, 200.0, ideal_llm=3.0, ideal_e2e=2.0),  # no full row at 60 s
    ]
    bench.add_relative(rows)
    assert rows[1]["speedup"]["llm_stage"] == pytest.approx(3.0)
    assert rows[1]["flop_efficiency"] == pytest.approx({"llm_stage": 0.9375, "end_to_end": 0.8})
    assert rows[3]["speedup"] is None and rows[3]["flop_efficiency"] is None
    gpu = {(c["stage"], c["method"]): c for c in bench.efficiency_checks(rows, enforce=True)}
    assert set(gpu) == {(s, m) for s in ("llm_stage", "end_to_end") for m in ("cs2_ste_20", "cs2_ste_10")}
    assert gpu[("llm_stage", "cs2_ste_20")]["status"] == "PASS"
    assert gpu[("end_to_end", "cs2_ste_20")]["status"] == "FAIL"
    assert gpu[("end_to_end", "cs2_ste_20")]["efficiency"] == pytest.approx(0.8)
    assert gpu[("end_to_end", "cs2_ste_20")]["achieved"] == pytest.approx(2.0)
    assert gpu[("end_to_end", "cs2_ste_20")]["ideal"] == 2.5
    assert gpu[("llm_stage", "cs2_ste_10")]["efficiency"] == pytest.approx(0.96)
    assert gpu[("end_to_end", "cs2_ste_10")]["efficiency"] == pytest.approx(2.5 / 2.6)
    assert gpu[("end_to_end", "cs2_ste_10")]["status"] == "PASS"
    cpu = bench.efficiency_checks(rows, enforce=False)
    assert {c["status"] for c in cpu} == {"INFO"}
    assert [c["efficiency"] for c in cpu] == [c["efficiency"] for c in gpu.values()]
    # The sieve: FLOP share 4.5/11.25 = 40% of its LLM stage vs time 40/120 = 33.3%; its FLOPs over
    # N/L = 4/36 of the full LLM stage's 36 TFLOP (4 TFLOP) = 1.125x, its time over 4/36 x 360 ms = 1.0x.
    (sieve,) = [s for s in bench.sieve_shares(rows) if s["method"] == "cs2_ste_20"]
    assert sieve["flop_share_llm_stage"] == pytest.approx(0.4)
    assert sieve["time_share_llm_stage"] == pytest.approx(40 / 120)
    assert sieve["flop_share_end_to_end"] == pytest.approx(4.5 / 35.25)
    assert sieve["time_share_end_to_end"] == pytest.approx(40 / 250)
    assert sieve["flops_over_nl_full_llm"] == pytest.approx(1.125)
    assert sieve["time_over_nl_full_llm"] == pytest.approx(1.0)


def test_memory_statement_reads_the_measured_ratios():
    bench = load_benchmark()
    mib = bench.MIB
    memory = [
        {"method": "full", "full": True, "seconds": 60.0, "inference": 20 * mib, "train": 80 * mib, "train_ckpt": 60 * mib},
        {"method": "cs2_ste_20", "full": False, "seconds": 60.0, "inference": 21 * mib, "train": 44 * mib,
         "train_ckpt": 57 * mib},
        {"method": "cs2_ste_5", "full": False, "seconds": 60.0, "inference": 22 * mib, "train": 36 * mib,
         "train_ckpt": 55 * mib},
    ]
    text = "\n".join(bench.memory_statement(memory))
    assert "Inference (prefill) peak: 60 s: 1.05-1.10x (no saving)" in text
    assert "Training-step peak: 60 s: 0.45-0.55x (CS2 needs 45-55% less)" in text
    assert "gradient checkpointing: 60 s: 0.92-0.95x (within 10%: little or no saving)" in text
    # A full-model peak under the resolution (CPU: pages, allocator) is not read as a saving or a cost.
    coarse = "\n".join(bench.memory_statement(memory, resolution=30 * mib))
    assert "Inference (prefill) peak: 60 s: 1.05-1.10x (below what peak RSS resolves" in coarse
    assert "Training-step peak: 60 s: 0.45-0.55x (CS2 needs 45-55% less)" in coarse


def test_paper_ceilings_of_the_3b_geometry():
    """End-to-end FLOP ceilings of CS2 on the 3B at 30/60/120 s, and the paper's speed-ups above them."""
    bench = load_benchmark()
    args = bench.parse_args(["--smoke", "--methods", "recipes/toy/baselines/full.yaml"])
    pc = bench.paper_ceilings(args)
    assert [c["seconds"] for c in pc["clips"]] == [30.0, 60.0, 120.0]
    c30 = pc["clips"][0]
    assert c30["tokens"] == 4482 and c30["sieve_layers"] == 4
    assert c30["encoder_share"] == pytest.approx(0.426, abs=0.001)
    assert [round(c30["budgets"][p]["end_to_end"], 2) for p in ("20", "10", "5")] == [1.63, 1.78, 1.86]
    for c in pc["clips"]:
        # Every paper speed-up (2.23/2.67/2.96x) is above the ceiling, and above the cap with no A/V token kept.
        assert all(b["paper_speedup"] > b["end_to_end"] for b in c["budgets"].values())
        assert min(b["paper_speedup"] for b in c["budgets"].values()) > c["ceiling_no_av_kept"]
        assert all(b["paper_speedup"] < b["llm_stage"] for b in c["budgets"].values())


def test_memory_is_measured_in_a_fresh_process_per_row_and_clip(tmp_path):
    """Full and CS2: peak RSS above resident for inference and a training step, with the analytic bytes beside it."""
    bench = load_benchmark()
    paths = bench.main(["--smoke", "--seconds", "2", "--memory-seconds", "2", "--repeats", "1", "--out", str(tmp_path),
                        "--methods", "recipes/toy/baselines/full.yaml", "recipes/toy/cs2_ste_5.yaml",
                        "recipes/toy/baselines/fastv_20.yaml"])
    result = json.loads(paths["json"].read_text())
    assert result["meta"]["memory"].startswith("peak RSS (VmHWM)")
    memory = {e["method"]: e for e in result["memory"]}
    assert set(memory) == {"full", "cs2_ste_5"}  # the full model and every row with a sieve
    for e in memory.values():
        assert "error" not in e, e
        assert all(isinstance(e[k], int) and e[k] >= 0 for k in ("inference", "train", "train_ckpt"))
        assert e["train"] > 0 and e["process_peak_rss"] > e["train"]
    full, cs2 = memory["full"]["analytic_mib"], memory["cs2_ste_5"]["analytic_mib"]
    assert cs2["kv_cache"] < full["kv_cache"] and cs2["activation"] == full["activation"]
    md = paths["md"].read_text()
    assert "| cs2_ste_5 | 2 s (82) |" in md and "Training-step peak: 2 s:" in md
    # On CPU the memory panels draw the measured peak RSS (MiB above resident), not an empty panel.
    fig = bench.figure(result)
    inference, train = fig.axes[2], fig.axes[3]
    assert "peak RSS" in inference.get_ylabel()
    drawn = {ln.get_label(): list(ln.get_ydata()) for ln in inference.lines}
    assert drawn == {name: [e["inference"] / 2**20] for name, e in memory.items()}
    plain = [ln for ln in train.lines if ln.get_linestyle() == "-"]
    assert sorted(ln.get_ydata()[0] for ln in plain) == sorted(e["train"] / 2**20 for e in memory.values())
    assert not [t for t in inference.texts if "not measured" in t.get_text()]


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
                             "--warmup", "1", "--memory", "skip", "--threads", "1", "--out", str(tmp_path),
                             "--methods", *recipes])
    result = bench.run(args, log=lambda line: None)
    assert result["skipped"] == [] and [r["method"] for r in result["rows"]] == [Path(r).stem for r in recipes]
    for row in result["rows"]:
        assert [round(t) for t in row["tokens_per_layer"]] == row["tokens_per_layer_analytic"], row["method"]
    by_name = {r["method"]: r for r in result["rows"]}
    assert by_name["cs2_ste_5"]["sieve_layers"] == 4
    assert by_name["pyramiddrop_5"]["effective_keep_ratio"] == pytest.approx(0.05, abs=0.01)
    assert by_name["cs2_ste_5"]["rope"].startswith("SyncRoPE") and by_name["full"]["rope"] == "model default (TMRoPE)"
