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
import statistics
from collections import defaultdict

import pytest
from _scripts import load_script
from _toy import TOY_ROW, toy_args

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
    assert {r["row"] for r in qrows} == {"cs2_ste_20", "ablation_causal"}
    table = {r["recipe"]: r for r in csv.DictReader((out / "ablation_toy_quick.csv").open())}
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
