"""Host syncs and straight-through arithmetic of evaluation prefills (benchmarks/op_counts.py's counter)."""

from __future__ import annotations

import collections

import pytest
import torch
from _scripts import load_script

from ep_kit.masks import Bidirectional, Causal, IntraModal
from ep_kit.models.tiny import SampleSpec
from ep_kit.reducers import CS2, RandomReducer


def _script():
    return load_script("op_counts")


def test_counter_sees_each_kind_of_host_sync_by_hand():
    oc = _script()
    x = torch.arange(6.0)
    mask = x > 2
    with oc.OpCounter() as counter:
        int(x.sum())  # sum + _local_scalar_dense: 1 sync
        x[mask]  # boolean index: 1 sync
        x.tolist()  # below the dispatcher, counted by the wrapper: 1 sync
        torch.where(mask, x, 0.0)  # no sync
        x[torch.tensor([0, 2])]  # integer index: no sync
    assert sum(counter.syncs.values()) == 3
    assert counter.syncs == {"_local_scalar_dense": 1, "index": 1, "tolist": 1}
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the wrapper is removed on exit
    assert torch.Tensor.tolist is not None and "wrapper" not in torch.Tensor.tolist.__name__


SPECS = [SampleSpec(prompt_len=6, answer_len=0, frames=4, height=56, width=56, audio_seconds=2.0),
         SampleSpec(prompt_len=3, answer_len=0, frames=6, height=28, width=56, audio_seconds=3.0)]


def _cs2_model(tiny_model, tiny_config, av_batch):
    cfg = tiny_config()
    return tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3), av_batch(cfg, SPECS, with_labels=False)


def test_score_and_select_costs_one_host_sync_at_evaluation(tiny_model, tiny_config, av_batch):
    """Scoring + Top-K + gather read the host once: the kept length and the NaN check, together."""
    oc = _script()
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=RandomReducer(seed=0), keep_ratio=0.3).eval()
    reduce = oc.count(model, av_batch(cfg, SPECS, with_labels=False))["reduce"]
    assert reduce["syncs"] == 1, reduce["sync_ops"]


@pytest.mark.parametrize("attention", [Bidirectional(), Causal(), IntraModal()], ids=repr)
def test_eval_cs2_reads_the_host_twice_on_a_padded_batch(tiny_model, tiny_config, av_batch, attention):
    """One read sizes the sieve's equal-length groups, one the kept sequence; the decoder's mask one more."""
    oc = _script()
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2, attention=attention), keep_ratio=0.3).eval()
    batch = av_batch(cfg, SPECS, with_labels=False)
    assert int(batch["attention_mask"].sum(-1).unique().numel()) == 2  # padded: two lengths, two sieve groups
    counts = oc.count(model, batch)
    assert counts["reduce"]["syncs"] == 2, counts["reduce"]["sync_ops"]
    assert counts["decoder"]["syncs"] == 1, counts["decoder"]["sync_ops"]


def _reduce_ops(oc, model, batch):
    with oc.OpCounter() as counter:
        marks = model.prefill(batch, clock=lambda: collections.Counter(counter.ops)).marks
    return marks[2] - marks[1]


def test_eval_cs2_does_no_straight_through_arithmetic(tiny_model, tiny_config, av_batch):
    oc = _script()
    model, batch = _cs2_model(tiny_model, tiny_config, av_batch)
    assert _reduce_ops(oc, model.train(), batch)["_softmax"] >= 1  # training: the STE softmax (the check can fail)
    with torch.no_grad():
        assert _reduce_ops(oc, model.eval(), batch)["_softmax"] == 0


def test_eval_cs2_without_straight_through_weights_gives_the_same_tokens(tiny_model, tiny_config, av_batch):
    """Weights are exactly 1 forward, so skipping them (no_grad) must not change a bit of the kept states."""
    model, batch = _cs2_model(tiny_model, tiny_config, av_batch)
    model.eval()
    with_weights = model.prefill(batch).kept  # autograd on: weights computed and multiplied
    with torch.no_grad():
        without = model.prefill(batch).kept
    assert torch.equal(with_weights.source_index, without.source_index)
    assert torch.equal(with_weights.hidden.detach(), without.hidden)


def test_op_counts_script_writes_every_main_table_method(tmp_path):
    oc = _script()
    stems = [r.stem for r in oc.recipes()]
    assert stems[:4] == ["full", "cs2_ste_20", "cs2_ste_10", "cs2_ste_5"] and "fastv_5" in stems and "omnizip_20" in stems
    result = oc.main(["--batch-size", "1", "--only", "full", "cs2_ste_5", "--out", str(tmp_path)])
    assert [r["method"] for r in result["rows"]] == ["full", "cs2_ste_5"]
    full = result["rows"][0]
    assert full["reduce"]["ops"] < 20 and full["ops"] == sum(full[s]["ops"] for s in oc.STAGES)
    assert (tmp_path / "op_counts.md").read_text().count("| cs2_ste_5 |") == 1


def test_label_logits_script_measures_both_modes(tmp_path):
    module = load_script("label_logits")
    result = module.main(["--sizes", "toy", "--repeats", "1", "--mem-steps", "1", "--out", str(tmp_path)])
    row = result["rows"][0]
    assert row["loss"]["all"] == pytest.approx(row["loss"]["labels"], rel=1e-6)
    assert row["labelled_rows"] == 2 and row["tokens"] > 100
    assert set(row["peak_rss_increase_mib"]) == {"all", "labels"}
    assert "| toy |" in (tmp_path / "label_logits_cpu.md").read_text()
