"""``TokenSequence``, the structure every component passes on: checks, masks, counts, keep/gather.

Every expected value is written out by hand on one small right-padded batch with variable lengths:

    row 0: T V A V T   (5 real tokens, the last one is the answer)
    row 1: V A T . .   (3 real tokens, the last one is the answer)
    row 2: . . . . .   (all padding)

Token ``(b, c)`` carries hidden ``[100b + 10c, 100b + 10c + 1]``, input id ``1000 + 10b + c`` and
rotary positions ``100a + 10b + c`` on axis ``a``; padding is zero (ids, positions, hidden) as the
model builds it.
"""

from __future__ import annotations

import pytest
import torch

from ep_kit.sequence import Modality, TokenSequence, answer_span

T, V, A, P = (int(m) for m in (Modality.TEXT, Modality.VIDEO, Modality.AUDIO, Modality.PAD))
MODALITY = [[T, V, A, V, T], [V, A, T, P, P], [P, P, P, P, P]]
LENGTHS = [5, 3, 0]


def _hidden(b: int, col: int) -> list[float]:
    return [100.0 * b + 10 * col, 100.0 * b + 10 * col + 1]


def make_batch(axes: int = 3, **changes) -> TokenSequence:
    B, L = 3, 5
    real = torch.tensor([[c < n for c in range(L)] for n in LENGTHS])
    hidden = torch.tensor([[_hidden(b, c) if real[b, c] else [0.0, 0.0] for c in range(L)] for b in range(B)])
    positions = torch.tensor(
        [[[100 * a + 10 * b + c if real[b, c] else 0 for c in range(L)] for b in range(B)]
         for a in range(axes)]
    )
    ids = torch.tensor([[1000 + 10 * b + c if real[b, c] else 0 for c in range(L)] for b in range(B)])
    labels = torch.full((B, L), -100)
    labels[0, 4], labels[1, 2] = 7, 8
    fields = dict(
        hidden=hidden,
        modality=torch.tensor(MODALITY),
        positions=positions,
        attention_mask=real,
        answer_mask=labels != -100,
        input_ids=ids,
        labels=labels,
    )
    fields.update(changes)
    return TokenSequence(**fields)


# ------------------------------------------------------------------------------ construction checks
def test_default_source_index_is_the_column_of_real_tokens():
    seq = make_batch()
    assert seq.source_index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1], [-1] * 5]
    # a mask that is not right-padded still gets each real token's own column
    holes = make_batch(attention_mask=torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 0, 0], [0] * 5]).bool())
    assert holes.source_index.tolist() == [[-1, 1, 2, -1, 4], [0, 1, 2, -1, -1], [-1] * 5]
    given = torch.arange(15).view(3, 5)
    assert make_batch(source_index=given).source_index is given  # an explicit index is kept as is


def test_sizes_and_four_axis_positions():
    seq = make_batch(axes=4)
    assert (seq.batch_size, seq.seq_len) == (3, 5)
    assert seq.positions.shape == (4, 3, 5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden": torch.zeros(3, 5)}, r"TokenSequence.hidden must be \(B, L, D\), got shape \(3, 5\)"),
        ({"modality": torch.zeros(3, 4, dtype=torch.long)},
         r"TokenSequence.modality must have shape \(B, L\) = \(3, 5\) like hidden, got \(3, 4\)"),
        ({"labels": torch.zeros(2, 5, dtype=torch.long)},
         r"TokenSequence.labels must have shape \(B, L\) = \(3, 5\) like hidden, got \(2, 5\)"),
        ({"source_index": torch.zeros(3, 6, dtype=torch.long)},
         r"TokenSequence.source_index must have shape \(B, L\) = \(3, 5\) like hidden, got \(3, 6\)"),
        ({"positions": torch.zeros(3, 3, 4, dtype=torch.long)},
         r"TokenSequence.positions must have shape \(axes, B, L\) = \(3 or 4, 3, 5\), got \(3, 3, 4\)"),
        ({"positions": torch.zeros(3, 5, dtype=torch.long)},
         r"TokenSequence.positions must have shape \(axes, B, L\) = \(3 or 4, 3, 5\), got \(3, 5\)"),
        ({"positions": torch.zeros(2, 3, 5, dtype=torch.long)},
         "TokenSequence.positions must have 3 or 4 axes, got 2"),
        ({"attention_mask": torch.ones(3, 5, dtype=torch.long)},
         "TokenSequence.attention_mask must be a bool tensor, got torch.int64"),
        ({"answer_mask": torch.zeros(3, 5)},
         "TokenSequence.answer_mask must be a bool tensor, got torch.float32"),
    ],
)
def test_inconsistent_fields_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        make_batch(**changes)


def test_replace_returns_a_checked_copy():
    seq = make_batch()
    doubled = seq.replace(hidden=2 * seq.hidden)
    assert doubled is not seq and torch.equal(doubled.hidden, 2 * seq.hidden)
    assert seq.hidden[0, 1].tolist() == _hidden(0, 1)  # the original is untouched
    assert doubled.source_index is seq.source_index and doubled.labels is seq.labels
    with pytest.raises(ValueError, match=r"TokenSequence.hidden must be \(B, L, D\)"):
        seq.replace(hidden=seq.hidden[0])


# ------------------------------------------------------------------------------------ masks, counts
def test_lengths_modality_masks_and_counts():
    seq = make_batch()
    assert seq.lengths.tolist() == LENGTHS
    assert seq.is_modality(Modality.TEXT).int().tolist() == [[1, 0, 0, 0, 1], [0, 0, 1, 0, 0], [0] * 5]
    assert seq.is_modality(Modality.VIDEO).int().tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0] * 5]
    assert seq.av_mask.int().tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0] * 5]
    assert seq.is_modality().int().tolist() == [[0] * 5] * 3
    assert seq.is_modality(Modality.PAD).int().tolist() == [[0] * 5] * 3  # padding is never "of" a modality
    assert seq.count(Modality.VIDEO, Modality.AUDIO).tolist() == [3, 2, 0]
    assert seq.count(Modality.TEXT).tolist() == [2, 1, 0]
    assert seq.count(Modality.AUDIO).tolist() == [1, 1, 0]
    assert seq.count(Modality.TEXT, Modality.VIDEO, Modality.AUDIO).tolist() == LENGTHS


def test_masks_follow_the_attention_mask_not_the_modality_ids_of_padding():
    """A padding slot whose modality id is not PAD (e.g. a sloppy caller) is still not counted."""
    modality = torch.tensor(MODALITY)
    modality[1, 3:] = V
    modality[2] = A
    seq = make_batch(modality=modality)
    assert seq.av_mask.int().tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0] * 5]
    assert seq.count(Modality.VIDEO, Modality.AUDIO).tolist() == [3, 2, 0]


# ---------------------------------------------------------------------------------------- keep
def _row(seq: TokenSequence, b: int) -> dict:
    return {
        "hidden": seq.hidden[b].tolist(),
        "modality": seq.modality[b].tolist(),
        "positions": seq.positions[:, b].tolist(),
        "attention_mask": seq.attention_mask[b].tolist(),
        "answer_mask": seq.answer_mask[b].tolist(),
        "input_ids": seq.input_ids[b].tolist(),
        "labels": seq.labels[b].tolist(),
        "source_index": seq.source_index[b].tolist(),
    }


def _expected_row(b: int, columns: list[int], width: int, axes: int = 3) -> dict:
    """Row ``b`` holding the original tokens ``columns`` in that order, right-padded to ``width``."""
    pad = width - len(columns)
    labels = {(0, 4): 7, (1, 2): 8}
    return {
        "hidden": [_hidden(b, c) for c in columns] + [[0.0, 0.0]] * pad,
        "modality": [MODALITY[b][c] for c in columns] + [P] * pad,
        "positions": [[100 * a + 10 * b + c for c in columns] + [0] * pad for a in range(axes)],
        "attention_mask": [True] * len(columns) + [False] * pad,
        "answer_mask": [(b, c) in labels for c in columns] + [False] * pad,
        "input_ids": [1000 + 10 * b + c for c in columns] + [0] * pad,
        "labels": [labels.get((b, c), -100) for c in columns] + [-100] * pad,
        "source_index": columns + [-1] * pad,
    }


def test_keep_gathers_each_row_in_order_and_pads_to_the_longest():
    seq = make_batch(axes=4)
    keep = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [0] * 5]).bool()
    kept = seq.keep(keep)
    assert kept.seq_len == 3
    assert _row(kept, 0) == _expected_row(0, [0, 2, 4], 3, axes=4)
    assert _row(kept, 1) == _expected_row(1, [1, 2], 3, axes=4)
    assert _row(kept, 2) == _expected_row(2, [], 3, axes=4)  # the all-padding row stays all padding
    assert kept.lengths.tolist() == [3, 2, 0]


def test_keep_never_keeps_padding_and_an_empty_row_becomes_padding():
    seq = make_batch()
    # row 1 asks only for padding slots, row 2 (all padding) asks for everything: both end up empty
    keep = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 1, 1], [1] * 5]).bool()
    kept = seq.keep(keep)
    assert kept.seq_len == 2
    assert _row(kept, 0) == _expected_row(0, [1, 3], 2)
    assert _row(kept, 1) == _expected_row(1, [], 2)
    assert _row(kept, 2) == _expected_row(2, [], 2)
    assert kept.count(Modality.VIDEO).tolist() == [2, 0, 0]


def test_keep_accepts_an_int_mask_and_keeping_everything_is_the_identity():
    seq = make_batch()
    kept = seq.keep(torch.ones(3, 5, dtype=torch.long))
    assert kept.seq_len == 5
    for b in range(3):
        assert _row(kept, b) == _expected_row(b, list(range(LENGTHS[b])), 5)


def test_keeping_nothing_leaves_a_zero_length_batch():
    kept = make_batch().keep(torch.zeros(3, 5, dtype=torch.bool))
    assert kept.hidden.shape == (3, 0, 2) and kept.positions.shape == (3, 3, 0)
    assert kept.lengths.tolist() == [0, 0, 0]


def test_source_index_refers_to_the_unreduced_sequence_after_repeated_keeps():
    seq = make_batch()
    # row 0 keeps columns 1-4, row 1 columns 0 and 2; then of those, row 0 columns 2 and 4, row 1 column 2
    first = seq.keep(torch.tensor([[0, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0] * 5]).bool())
    second = first.keep(torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0], [0] * 4]).bool())
    assert second.source_index.tolist() == [[2, 4], [2, -1], [-1, -1]]
    assert _row(second, 0) == _expected_row(0, [2, 4], 2)
    assert _row(second, 1) == _expected_row(1, [2], 2)


def test_keep_carries_the_gradient_of_weights_multiplied_into_hidden():
    seq = make_batch()
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0], [0.0] * 5])
    weight.requires_grad_(True)
    keep = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0] * 5]).bool()
    kept = seq.replace(hidden=seq.hidden * weight[..., None]).keep(keep)
    assert kept.hidden[0].tolist() == [[0.0, 1.0], [120.0, 124.0]]  # token 0 times 1, token 3 times 4
    kept.hidden.sum().backward()
    # d/dw of sum(w * h) over kept tokens: the token's hidden sum, 0 for dropped tokens
    assert weight.grad.tolist() == [[1.0, 0.0, 0.0, 61.0, 0.0], [0.0, 221.0, 0.0, 0.0, 0.0], [0.0] * 5]


def test_keep_mask_of_another_shape_is_refused():
    with pytest.raises(ValueError, match=r"keep mask must have shape \(3, 5\), got \(3, 4\)"):
        make_batch().keep(torch.ones(3, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- gather
def test_gather_reorders_repeats_and_pads_invalid_slots():
    seq = make_batch()
    index = torch.tensor([[4, 0, 3], [2, 2, 0], [0, 1, 2]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]]).bool()
    out = seq.gather(index, valid)
    assert _row(out, 0) == _expected_row(0, [4, 0, 3], 3)
    assert _row(out, 1) == _expected_row(1, [2, 2], 3)  # a repeated column is gathered twice
    assert _row(out, 2) == _expected_row(2, [], 3)


def test_gather_without_labels_keeps_none():
    index, valid = torch.tensor([[1], [0], [0]]), torch.tensor([[True], [True], [False]])
    out = make_batch(labels=None).gather(index, valid)
    assert out.labels is None
    assert out.input_ids.tolist() == [[1001], [1010], [0]]


# ----------------------------------------------------------------------------------- answer_span
def test_answer_span_runs_from_the_first_label_to_the_end_of_the_row():
    labels = torch.tensor([[-100, -100, 5, -100, 6], [-100] * 5, [3, -100, -100, -100, -100]])
    assert answer_span(labels).int().tolist() == [[0, 0, 1, 1, 1], [0] * 5, [1] * 5]
    # another ignore index, and a single row (the last axis is the sequence)
    assert answer_span(torch.tensor([0, 0, 9, 0]), ignore_index=0).tolist() == [False, False, True, True]
    assert answer_span(torch.tensor([[-100, -100]])).tolist() == [[False, False]]
