"""Scorers against hand computations (float64 MLP, hand-picked vectors for the heuristics)."""

import copy
import math

import pytest
import torch

from ep_kit.scorers import (
    MLPScorer,
    NeighbourNoveltyScorer,
    NormScorer,
    PerModalityScorer,
    RandomScorer,
    SimilarityScorer,
)
from ep_kit.sequence import Modality, TokenSequence

T, V, A, P = int(Modality.TEXT), int(Modality.VIDEO), int(Modality.AUDIO), int(Modality.PAD)


def make_seq(hidden, modality, answer=None):
    hidden = torch.as_tensor(hidden, dtype=torch.float32)
    modality = torch.tensor(modality)
    B, L = modality.shape
    answer = torch.zeros(B, L, dtype=torch.bool) if answer is None else torch.tensor(answer, dtype=torch.bool)
    return TokenSequence(
        hidden=hidden,
        modality=modality,
        positions=torch.zeros(3, B, L, dtype=torch.long),
        attention_mask=modality != P,
        answer_mask=answer,
        input_ids=torch.zeros(B, L, dtype=torch.long),
    )


def test_mlp_scorer_layout_and_float64_reference():
    torch.manual_seed(0)
    scorer = MLPScorer(16, eps=1e-6)
    with torch.no_grad():
        scorer.ln.weight.uniform_(0.5, 1.5)
    assert sorted(n for n, _ in scorer.named_parameters()) == [
        "ln.weight",
        "score_head.0.bias",
        "score_head.0.weight",
        "score_head.2.bias",
        "score_head.2.weight",
    ]
    x = torch.randn(2, 5, 16)
    seq = make_seq(x, [[T, V, V, A, T], [V, A, P, P, P]])
    out = scorer(seq)
    assert out.shape == (2, 5) and out.dtype == torch.float32

    p = {n: t.detach().double() for n, t in scorer.named_parameters()}
    h = x.double()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * p["ln.weight"]
    h = h @ p["score_head.0.weight"].T + p["score_head.0.bias"]
    h = h * torch.sigmoid(h)
    ref = (h @ p["score_head.2.weight"].T + p["score_head.2.bias"]).squeeze(-1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in scorer.parameters())


def test_mlp_scorer_bf16_returns_float32_and_checks_size():
    scorer = MLPScorer(8).to(torch.bfloat16)
    seq = make_seq(torch.randn(1, 3, 8), [[T, V, A]])
    seq = seq.replace(hidden=seq.hidden.to(torch.bfloat16))
    assert scorer(seq).dtype == torch.float32
    with pytest.raises(ValueError, match=r"MLPScorer\(hidden_size=8\) got hidden states of size 4"):
        MLPScorer(8)(make_seq(torch.randn(1, 3, 4), [[T, V, A]]))
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        MLPScorer(0)


def test_instruction_similarity_hand_case():
    e = torch.eye(4)
    # sample 0: text e0, text e1, video e0, audio e2, answer-text 10*e3 (excluded from the instruction)
    # sample 1: no non-answer text -> reference is the mean of its A/V tokens (e0 + e1)/2
    hidden = torch.stack(
        [
            torch.stack([e[0], e[1], e[0], e[2], 10 * e[3]]),
            torch.stack([e[0], e[1], e[3], torch.zeros(4), torch.zeros(4)]),
        ]
    )
    seq = make_seq(hidden, [[T, T, V, A, T], [V, A, T, P, P]], answer=[[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    scorer = SimilarityScorer(4)
    s = scorer(seq)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s[0], torch.tensor([r, r, r, 0.0, 0.0]))
    torch.testing.assert_close(s[1], torch.tensor([r, r, 0.0, 0.0, 0.0]))
    assert len(list(scorer.parameters())) == 0


def test_neighbour_novelty_hand_case():
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    # T, V(a), V(2a), A(b), V(c), A(-b), T(a), A(b + c)
    hidden = torch.stack([a, a, 2 * a, b, c, -b, a, b + c])[None]
    seq = make_seq(hidden, [[T, V, V, A, V, A, T, A]])
    s = NeighbourNoveltyScorer(3)(seq)
    # Per modality, 1 - cos with the previous token of that modality; the first compares with the next.
    # T: a vs a -> 0, 0.  V: a vs 2a (next) 0; 2a vs a 0; c vs 2a 1.  A: b vs -b (next) 2; -b vs b 2;
    # b+c vs -b: 1 + 1/sqrt(2).
    expected = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, 2.0, 0.0, 1 + 1 / math.sqrt(2)])
    torch.testing.assert_close(s[0], expected)
    # Scored over one pool only, a lone token scores 0.
    lone = NeighbourNoveltyScorer(3).score(seq, seq.is_modality(Modality.VIDEO) & (torch.arange(8) == 4))
    assert lone.abs().sum() == 0


def test_rule_scorers_per_modality_and_norm():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0]]])
    seq = make_seq(hidden, [[T, V, A, V]])
    norms = NormScorer(2)(seq)
    torch.testing.assert_close(norms[0], torch.tensor([5.0, 1.0, 2.0, 10.0]))
    # Video by norm, audio by neighbour novelty (lone audio token: 0); text scores 0.
    mixed = PerModalityScorer(2, video=NormScorer, audio=NeighbourNoveltyScorer)(seq)
    torch.testing.assert_close(mixed[0], torch.tensor([0.0, 1.0, 0.0, 10.0]))


def test_similarity_scores_carry_no_gradient():
    hidden = torch.randn(1, 4, 6, requires_grad=True)
    seq = make_seq(hidden.detach(), [[T, V, A, V]]).replace(hidden=hidden)
    for scorer in (SimilarityScorer(6), NeighbourNoveltyScorer(6), PerModalityScorer(6)):
        assert not scorer(seq).requires_grad


def test_random_scorer_seeded_and_uniform():
    seq = make_seq(torch.zeros(3, 50, 4), [[V] * 50] * 3)
    a, b, c = RandomScorer(4, seed=3), RandomScorer(4, seed=3), RandomScorer(4, seed=4)
    sa, sb, sc = a(seq), b(seq), c(seq)
    assert sa.dtype == torch.float32 and sa.shape == (3, 50)
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert not torch.equal(a(seq), sa)  # the generator advances
    assert (sa >= 0).all() and (sa < 1).all() and 0.3 < sa.mean() < 0.7
    assert torch.equal(torch.rand(3, 50, generator=torch.Generator().manual_seed(3)), sa)
    copy.deepcopy(a)  # modules get deep-copied by Lightning / config tools
