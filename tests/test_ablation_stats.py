"""Per-question test outcomes (fit_then_test_run) and the toy ablation report built on them.

* The outcomes of a test run count the questions as the logged metrics do: their mean is ``test/acc``,
  their per-category means are ``test/acc/<benchmark>/<category>``, their token counts give the
  logged budget shares.
* ``benchmarks/ablation.py --scale toy --quick`` on two rows of tiny data writes the hypotheses before
  any training, then the report: intervals, verdicts, and a per-question csv from which the table's
  accuracies are recomputed here with plain Python.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict

import pytest
from _scripts import load_script
from _toy import REPO, TOY_ROW, toy_args

from ep_kit.cli import fit_then_test_run
from ep_kit.recipes import config_args


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("outcomes")
    return fit_then_test_run([*config_args(TOY_ROW), *toy_args(root, num_test=13)])


def test_outcomes_reproduce_the_logged_test_metrics(toy_result):
    m, outcomes = toy_result.metrics, toy_result.outcomes
    assert len(outcomes) == 13 == int(m["test/count"])
    assert len({o.question_id for o in outcomes}) == 13
    assert statistics.fmean(o.correct for o in outcomes) == pytest.approx(m["test/acc"])
    by_cat = defaultdict(list)
    for o in outcomes:
        by_cat[f"test/acc/{o.benchmark}/{o.category}"].append(o.correct)
    assert by_cat and all(statistics.fmean(v) == pytest.approx(m[k]) for k, v in by_cat.items())
    assert {k for k in m if k.count("/") == 3 and k.startswith("test/acc/")} == set(by_cat)
    kept_v, kept_a = sum(o.kept_video for o in outcomes), sum(o.kept_audio for o in outcomes)
    assert kept_v / (kept_v + kept_a) == pytest.approx(m["test/video_share"], abs=1e-6)
    assert (kept_v + kept_a) / sum(o.n_video + o.n_audio for o in outcomes) == pytest.approx(
        m["test/realised_keep_ratio"], abs=1e-6)
    assert all(o.predicted in "ABCD" and o.correct in (0, 1) for o in outcomes)


def test_outcomes_are_those_of_predict(toy_result):
    """The predicted letters equal what the module answers question by question (its predict path)."""
    cli = toy_result.cli
    preds = cli.trainer.predict(cli.model, dataloaders=cli.datamodule.test_dataloader())
    answers = {r["question_id"]: (r["answer"], int(r["correct"])) for batch in preds for r in batch}
    assert {o.question_id: (o.predicted, o.correct) for o in toy_result.outcomes} == answers


def test_ddp_test_run_writes_every_question_once(tmp_path):
    """2-process DDP ``ep-kit test``: test_questions.jsonl holds each question once (gathered, de-duplicated),
    and its mean is the logged accuracy."""
    args = toy_args(tmp_path, num_test=5)
    cmd = [sys.executable, "-m", "ep_kit.cli", "test", "--config", str(TOY_ROW), *args,
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics_file = next((tmp_path / "runs").rglob("test_metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    lines = [json.loads(x) for x in (metrics_file.parent / "test_questions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 == metrics["test/count"] and len({x["question_id"] for x in lines}) == 5
    assert statistics.fmean(x["correct"] for x in lines) == pytest.approx(metrics["test/acc"])


def test_aliasing_figure_layouts_are_the_toy_models(toy_result):
    ab = load_script("ablation")
    rope = toy_result.cli.model.model.rope  # the fitted full row's bound Sync-RoPE
    assert ab.tiny_text_config() == (rope.head_dim, rope.base)
    (sync_label, sync), (tm_label, tm) = ab.toy_rope_layouts()
    assert list(sync.sections) == list(rope.sections) == [2, 2, 2, 2] and list(tm.sections) == [2, 3, 3]


def test_ablation_quick_toy_report(tmp_path):
    ab = load_script("ablation")
    out = tmp_path / "tables"
    seen_before_training = []
    original = ab.run_row

    def run_row(*args, **kwargs):
        seen_before_training.append((out / "ablation_toy_quick.md").read_text())
        return original(*args, **kwargs)

    ab.run_row = run_row
    overrides = [f"--override={a}" for a in toy_args(tmp_path, num_train=8, num_val=4, num_test=15)]
    md = ab.main(["--scale", "toy", "--quick", "--rows", "cs2_ste_20", "ablation_causal", "--seeds", "2",
                  "--out", str(out), *overrides])
    assert len(seen_before_training) == 4
    assert "## Hypotheses (fixed before the run)" in seen_before_training[0]
    assert "Table" not in seen_before_training[0]
    text = md.read_text()
    for needle in ("## Hypotheses (fixed before the run)", "`query`", "ablation_gumbel", "[95% CI]",
                   "## The paper's orderings", "| EchoingPixels (full) > Causal attention |", "## Hypotheses: verdicts",
                   "not measured", "## Accuracy per probe", "15 test questions"):
        assert needle in text, needle
    assert any(v in text for v in ("| reproduced |", "| refuted |", "| unresolved |"))
    # recompute every row's accuracy and per-seed accuracies from the per-question csv
    qrows = list(csv.DictReader((out / "ablation_toy_quick_questions.csv").open()))
    assert {r["row"] for r in qrows} == {"cs2_ste_20", "ablation_causal", "base_all_tokens"}
    table = {r["recipe"]: r for r in csv.DictReader((out / "ablation_toy_quick.csv").open())}
    # the reference row: the toy base tested once with every token, on the same 15 questions
    base = table.pop("base_all_tokens")
    base_q = [q for q in qrows if q["row"] == "base_all_tokens"]
    assert {q["seed"] for q in base_q} == {"0"} and len(base_q) == 15
    assert {q["question_id"] for q in base_q} == {q["question_id"] for q in qrows if q["row"] == "cs2_ste_20"}
    assert all(q["kept_video"] != "0" for q in base_q)  # nothing dropped: every video token kept
    assert float(base["mean_acc"]) == pytest.approx(statistics.fmean(int(q["correct"]) for q in base_q))
    assert float(base["realised_keep_ratio"]) == pytest.approx(1.0)
    assert "| Toy base, all tokens (reference) | - | " in text and "Base, all tokens (%) [95% CI]" in text
    for recipe, row in table.items():
        per_seed = defaultdict(list)
        for q in qrows:
            if q["row"] == recipe:
                per_seed[q["seed"]].append(int(q["correct"]))
        assert sorted(per_seed) == ["0", "1"] and all(len(v) == 15 for v in per_seed.values())
        seed_accs = [sum(v) / len(v) for _, v in sorted(per_seed.items())]
        assert float(row["mean_acc"]) == pytest.approx(sum(seed_accs) / 2)
        assert [float(row["seed_0"]), float(row["seed_1"])] == pytest.approx(seed_accs)
        assert float(row["ci_low"]) <= float(row["mean_acc"]) <= float(row["ci_high"])
        assert f"| {row['row']} | {float(row['paper_daily_omni']):.2f} | {100 * float(row['mean_acc']):.1f} [" in text
    # the paired difference is the difference of the two means (same questions)
    diff = float(table["ablation_causal"]["diff_vs_full"])
    assert diff == pytest.approx(float(table["ablation_causal"]["mean_acc"]) - float(table["cs2_ste_20"]["mean_acc"]))
    for png in ("ablation_toy_quick.png", "ablation_toy_quick_aliasing.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --rows-from: the same report recomputed from the recorded answers, no row trained again
    trained = len(seen_before_training)
    again = tmp_path / "again"
    md2 = ab.main(["--scale", "toy", "--quick", "--rows", "cs2_ste_20", "ablation_causal", "--rows-from", str(out),
                   "--out", str(again), *overrides])
    assert len(seen_before_training) == trained
    table2 = {r["recipe"]: r for r in csv.DictReader((again / "ablation_toy_quick.csv").open())}
    table2.pop("base_all_tokens")
    assert set(table2) == set(table)
    for recipe, row in table.items():
        for col in ("mean_acc", "ci_low", "ci_high", "diff_vs_full", "realised_keep_ratio"):
            assert table2[recipe][col] == row[col], (recipe, col)
        for col in ("seed_0", "seed_1"):  # logged in float32 by the run, recomputed in float64 here
            assert float(table2[recipe][col]) == pytest.approx(float(row[col]), abs=1e-6)
    text2 = md2.read_text()
    assert "Rows: recomputed, without training" in text2 and "ablation_toy_quick_questions.csv" in text2
    recorded_commit = next(ln for ln in text.splitlines() if ln.startswith("Commit: `")).split("`")[1]
    recorded_wall = text.split("Wall time: ", 1)[1].split(";")[0]
    assert f"its commit `{recorded_commit}`, wall time {recorded_wall})" in text2
    assert text2.split("## Table")[1] == text.split("## Table")[1]  # every number after the header


def _fake_rows(ab, n_per_probe: int = 48):
    """Rows of known outcomes: every row right on every question, except where a probe's hypothesis bites.

    The causal row misses every ``query`` question; the TMRoPE row misses ``order_long`` more often the
    longer the clip (0, 1/4, 1/2, 3/4 of them at 8, 16, 24, 32 s); the others equal the full row.
    """
    from ep_kit.train.metrics import QuestionOutcome

    cats = ["query", "binding", "order_long", "distractor", "quota", "av_saliency"]
    questions, order = {}, []
    for c in cats:
        for i in range(n_per_probe):
            qid = f"{c}-{i}"
            questions[qid] = {"category": c, "seconds": [8, 16, 24, 32][i % 4] if c == "order_long" else 4}
            order.append(qid)

    def correct(recipe: str, qid: str) -> int:
        info, i = questions[qid], int(qid.rsplit("-", 1)[1])
        if recipe == "ablation_causal" and info["category"] == "query":
            return 0
        if recipe == "ablation_no_syncrope" and info["category"] == "order_long":
            return int((i // 4) % 4 >= [8, 16, 24, 32].index(info["seconds"]))
        return 1

    rows = []
    for recipe, name, paper in ab.ROWS:
        if recipe not in ("ablation_causal", "ablation_no_syncrope", "ablation_gumbel", "cs2_ste_20"):
            continue
        row = ab.ToyRow(recipe, name, paper)
        for seed in range(3):
            recs = [QuestionOutcome("synthetic_av", q, questions[q]["category"], correct(recipe, q), "A", 1, 2, 10, 40)
                    for q in order]
            acc = statistics.fmean(r.correct for r in recs)
            row.runs.append(ab.SeedRun(seed, {"test/acc": acc, "test/realised_keep_ratio": 0.2,
                                              "test/audio_share": 0.67}, recs))
        rows.append(row)
    return rows, questions


def test_toy_report_on_known_outcomes(tmp_path):
    ab = load_script("ablation")
    from ep_kit.train.metrics import QuestionOutcome

    rows, questions = _fake_rows(ab)
    # the base, all tokens: right on every question but the `query` ones (at chance there: 1 in 4 right)
    base = [QuestionOutcome("synthetic_av", q, questions[q]["category"],
                            int(questions[q]["category"] != "query" or int(q.rsplit("-", 1)[1]) % 4 == 0), "A", 10, 40, 10, 40)
            for q in questions]
    for q in questions.values():
        q["chance"] = 0.25
    table = ab.toy_statistics(rows, questions, resamples=500, ceiling=ab.SeedRun(0, {"test/acc": 0.9}, base))
    assert table.at_chance("query") and not any(table.at_chance(c) for c in ("binding", "order_long", "quota"))
    assert table.ceiling.probe_acc["binding"].mean == 1.0
    assert table.ceiling.probe_acc["query"].mean == pytest.approx(0.25)
    verdicts = {(h.probe, h.row): h for h in table.hypotheses}
    assert verdicts[("query", "ablation_causal")].at_chance
    assert not verdicts[("order_long", "ablation_no_syncrope")].at_chance
    assert verdicts[("query", "ablation_causal")].verdict == "supported"
    assert verdicts[("query", "ablation_causal")].diff.estimate == pytest.approx(1.0)
    assert verdicts[("order_long", "ablation_no_syncrope")].verdict == "supported"
    assert verdicts[("binding", "ablation_no_prefusion")].verdict == "not measured (row not run)"
    assert {L: d.estimate for L, d in table.length_diff.items()} == pytest.approx({8: 0.0, 16: 0.25, 24: 0.5, 32: 0.75})
    assert table.length_slope.estimate == pytest.approx(0.75 / 24) and table.length_slope.low > 0
    by_pair = {(o.higher, o.lower): o for o in table.orderings}
    # paper: full 60.65 > gumbel 59.06 > no_syncrope 57.98 > causal 56.06
    assert by_pair[("cs2_ste_20", "ablation_causal")].verdict == "reproduced"
    assert by_pair[("cs2_ste_20", "ablation_causal")].carrier == "query"
    assert by_pair[("cs2_ste_20", "ablation_gumbel")].verdict == "unresolved"  # identical outcomes
    assert by_pair[("ablation_no_syncrope", "ablation_causal")].verdict == "reproduced"  # 0.9375 vs 0.833 overall
    assert by_pair[("ablation_no_syncrope", "ablation_causal")].carrier == "query"
    assert by_pair[("cs2_ste_20", "ablation_no_syncrope")].carrier == "order_long"
    md = ab.write_outputs(tmp_path, table, "cmd", 60.0, quick=False)
    text = md.read_text()
    assert "| Sync-RoPE - TMRoPE (points) | +0.0 [0.0, 0.0] | +25.0 [" in text
    assert "grows with length" in text
    assert "| EchoingPixels (full) > Causal attention | +4.59 | +16.7 [12.5, 21.5] | reproduced | `query` |" in text
    assert "| `query` | Causal attention | +100.0 [100.0, 100.0] | supported | " in text
    assert "(chance) |" in text.split("| `query` | Causal attention |")[1].splitlines()[0]
    assert "The toy base answers `query` at chance with every token" in text
    assert "`order_long` 48" in text and "Video share of the A/V input tokens: 0.200" in text
    assert (tmp_path / "ablation_toy_aliasing.png").read_bytes()[:4] == b"\x89PNG"


def test_main_table_toy_has_per_probe_columns_from_the_same_outcomes(tmp_path):
    mt = load_script("main_table")
    out = tmp_path / "tables"
    overrides = [f"--override={a}" for a in toy_args(tmp_path, num_test=10)]
    assert mt.main(["--scale", "toy", "--methods", "Random", "--ratios", "0.2", "--out", str(out), *overrides]) == 0
    text = (out / "main_table_toy.md").read_text()
    assert "## Accuracy per probe (%) [95% CI]" in text
    main_rows = {r["method"]: r for r in csv.DictReader((out / "main_table_toy.csv").open())}
    probe_rows = {r["method"]: r for r in csv.DictReader((out / "main_table_toy_probes.csv").open())}
    assert set(probe_rows) == {"Full", "Random"}
    cats = [k for k in probe_rows["Full"] if k not in ("method", "budget") and not k.endswith(("_ci_low", "_ci_high"))]
    assert sorted(cats) == sorted(["av_saliency", "temporal_order", "sound_only", "picture_only", "sync"])
    for method, row in probe_rows.items():
        accs = [float(row[c]) for c in cats]  # 2 questions per type: the overall accuracy is their mean
        assert 100 * sum(accs) / len(accs) == pytest.approx(float(main_rows[method]["overall acc"]), abs=0.05)
        assert all(float(row[f"{c}_ci_low"]) <= float(row[c]) <= float(row[f"{c}_ci_high"]) for c in cats)
