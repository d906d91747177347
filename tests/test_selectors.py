"""Selectors: exact budgets, Top-K choice, straight-through values and gradients, per-modality pools."""

import math

import pytest
import torch

from ep_kit.selectors import GumbelTopK, HardTopK, PerModalityTopK, STETopK
from ep_kit.sequence import Modality, TokenSequence

T, V, A = int(Modality.TEXT), int(Modality.VIDEO), int(Modality.AUDIO)

# (n candidates, keep ratio) -> k, computed by hand as min(n, max(1, ceil(r * n)))
K_TABLE = {
    (1, 1e-6): 1,
    (1, 0.05): 1,
    (1, 1.0): 1,
    (3, 0.33): 1,
    (3, 0.34): 2,
    (3, 0.5): 2,
    (3, 1.0): 3,
    (7, 1e-6): 1,
    (7, 0.5): 4,
    (9, 0.2): 2,
    (10, 0.1): 1,
    (10, 1.0): 10,
    (20, 0.05): 1,
    (21, 0.05): 2,
    (30, 0.1): 3,
    (30, 0.2): 6,
    (100, 0.05): 5,
    (100, 0.2): 20,
    (1000, 1e-6): 1,
    (1000, 0.05): 50,
    (1001, 0.1): 101,
}


def candidates_batch(ns, text_prefix=2, pad_extra=1):
    L = max(ns) + text_prefix + pad_extra
    cand = torch.zeros(len(ns), L, dtype=torch.bool)
    for b, n in enumerate(ns):
        cand[b, text_prefix : text_prefix + n] = True
    return cand


@pytest.mark.parametrize("selector", [HardTopK(), STETopK(), GumbelTopK().eval(), PerModalityTopK(STETopK())])
@pytest.mark.parametrize("ratio", sorted({r for _, r in K_TABLE}))
def test_k_is_exact(selector, ratio):
    ns = [n for n, r in K_TABLE if r == ratio]
    cand = candidates_batch(ns)
    scores = torch.randn(cand.shape, generator=torch.Generator().manual_seed(0))
    modality = torch.where(cand, V, T)
    sel = selector(scores, cand, ratio, modality)
    expect = [K_TABLE[(n, ratio)] for n in ns]
    assert sel.k.tolist() == expect
    assert sel.keep.sum(-1).tolist() == expect
    assert not (sel.keep & ~cand).any()


def test_top_k_choice_hand_case():
    scores = torch.tensor([[5.0, 0.9, 0.5, 0.9, 0.2, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    cand = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sel = HardTopK()(scores, cand, 0.5)
    # row 0: n=4, k=2: the two 0.9s; text (5.0, 7.0) is never selected. row 1: n=5, k=3: ties -> lower index
    assert sel.keep.tolist() == [[0, 1, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert sel.weight is None
    # candidates rank before non-candidates even at -inf
    s = torch.tensor([[float("-inf"), float("-inf"), 3.0]])
    sel = HardTopK()(s, torch.tensor([[True, True, False]]), 1.0)
    assert sel.keep.tolist() == [[True, True, False]]


def reference_soft(scores, cand, tau):
    """Float64 softmax over candidates, written out (exp / sum of exp), independent of the module."""
    s = scores.double() / tau
    big = torch.where(cand, s, torch.full_like(s, -1e300)).max(-1, keepdim=True).values
    e = torch.where(cand, torch.exp(s - big), torch.zeros_like(s))
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_ste_forward_exact_and_gradient_of_soft_weights(tau):
    g = torch.Generator().manual_seed(7)
    B, L = 3, 12
    cand = torch.rand(B, L, generator=g) < 0.7
    cand[:, 0] = False  # text
    scores = torch.randn(B, L, generator=g) * 2
    coeff = torch.randn(B, L, generator=g)

    s1 = scores.clone().requires_grad_(True)
    sel = STETopK(tau)(s1, cand, 0.3)
    hard = HardTopK()(scores, cand, 0.3)
    assert torch.equal(sel.keep, hard.keep)
    # forward: exactly the hard selection (1 on kept and on non-candidates, 0 on dropped candidates)
    assert torch.equal(sel.weight.detach(), torch.where(cand, sel.keep.float(), torch.ones(B, L)))
    (sel.weight * coeff).sum().backward()

    s2 = scores.double().clone().requires_grad_(True)
    y = reference_soft(s2, cand, tau)
    (torch.where(cand, y, torch.zeros_like(y)) * coeff.double()).sum().backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-5, atol=1e-6)
    assert s1.grad.abs().sum() > 0


def test_selection_apply_keeps_values_and_routes_gradient():
    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0]], requires_grad=True)
    cand = torch.tensor([[False, True, True, True]])
    sel = STETopK()(scores, cand, 0.5)
    hidden = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    out = sel.apply(hidden)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, :3], hidden[0, :3])  # kept and text: unchanged, exactly
    out[0, 1].float().sum().backward()
    assert scores.grad[0, 0] == 0 and scores.grad[0, 1] != 0


def test_no_candidates_selects_nothing_without_error():
    scores = torch.randn(2, 5, requires_grad=True)
    cand = torch.zeros(2, 5, dtype=torch.bool)
    cand[1, 2:] = True
    modality = torch.full((2, 5), T)
    modality[1, 2:] = A
    for selector in (HardTopK(), STETopK(), GumbelTopK(), PerModalityTopK(STETopK())):
        sel = selector(scores, cand, 0.2, modality)
        assert sel.k.tolist() == [0, 1] and not sel.keep[0].any() and sel.keep[1].sum() == 1
        if sel.weight is not None:
            assert torch.isfinite(sel.weight).all() and torch.equal(sel.weight[0].detach(), torch.ones(5))
            sel.weight.sum().backward()
            assert torch.isfinite(scores.grad).all()
            scores.grad = None
    empty = HardTopK()(scores, torch.zeros(2, 5, dtype=torch.bool), 0.5)
    assert not empty.keep.any() and empty.k.tolist() == [0, 0]


def test_per_modality_budgets_exact_and_soft_weights_per_pool():
    # sample 0: 9 video + 1 audio; r = 0.2 -> video ceil(1.8)=2, audio 1 (joint would keep ceil(2.0)=2)
    # sample 1: 3 video + 6 audio; r = 0.2 -> video 1, audio ceil(1.2)=2
    modality = torch.tensor([[T] + [V] * 9 + [A] + [T], [T] + [V] * 3 + [A] * 6 + [T, T]])
    cand = (modality == V) | (modality == A)
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(modality.shape, generator=g)
    scores[0, 10] = -10.0  # the lone audio token is kept anyway: its own pool
    sel = PerModalityTopK(HardTopK())(scores, cand, 0.2, modality)
    assert ((sel.keep & (modality == V)).sum(-1)).tolist() == [2, 1]
    assert ((sel.keep & (modality == A)).sum(-1)).tolist() == [1, 2]
    assert sel.k.tolist() == [3, 3] and sel.weight is None
    joint = HardTopK()(scores, cand, 0.2)
    assert joint.k.tolist() == [2, 2]
    # the choice inside each pool is that pool's own Top-K
    for m in (V, A):
        pool = HardTopK()(scores, cand & (modality == m), 0.2)
        assert torch.equal(sel.keep & (modality == m), pool.keep)

    s1 = scores.clone().requires_grad_(True)
    ste = PerModalityTopK(STETopK(tau=0.7))(s1, cand, 0.2, modality)
    assert torch.equal(ste.keep, sel.keep)
    coeff = torch.randn(modality.shape, generator=g)
    (ste.weight * coeff).sum().backward()
    s2 = scores.double().clone().requires_grad_(True)
    loss = 0
    for m in (V, A):
        pool = cand & (modality == m)
        y = reference_soft(s2, pool, 0.7)
        loss = loss + (torch.where(pool, y, torch.zeros_like(y)) * coeff.double()).sum()
    loss.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-5, atol=1e-6)


def test_kept_order_preserved_through_token_sequence_keep():
    B, L, D = 2, 8, 4
    modality = torch.tensor([[T, V, V, A, V, A, T, T], [T, A, V, V, V, T, 3, 3]])
    real = modality != 3
    seq = TokenSequence(
        hidden=torch.randn(B, L, D),
        modality=modality,
        positions=torch.arange(L)[None, None].expand(3, B, L).clone(),
        attention_mask=real,
        answer_mask=torch.zeros(B, L, dtype=torch.bool),
        input_ids=torch.zeros(B, L, dtype=torch.long),
    )
    # scores decreasing with index would hide reordering; make later tokens score higher
    scores = torch.tensor([[0, 1, 5, 9, 2, 8, 0, 0], [0, 7, 1, 6, 9, 0, 0, 0]], dtype=torch.float)
    sel = STETopK()(scores, seq.av_mask, 0.5)
    assert sel.keep.tolist() == [
        [0, 0, 1, 1, 0, 1, 0, 0],  # n=5 -> k=3: scores 9, 8, 5
        [0, 1, 0, 0, 1, 0, 0, 0],  # n=4 -> k=2: scores 9, 7
    ]
    kept = seq.replace(hidden=sel.apply(seq.hidden)).keep(sel.keep | seq.is_modality(Modality.TEXT))
    assert kept.source_index.tolist() == [[0, 2, 3, 5, 6, 7], [0, 1, 4, 5, -1, -1]]
    assert torch.equal(kept.hidden[0], seq.hidden[0, [0, 2, 3, 5, 6, 7]])


def test_gumbel_eval_is_hard_topk_and_training_is_noisy():
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(4, 20, generator=g)
    cand = torch.ones(4, 20, dtype=torch.bool)
    cand[:, :3] = False
    gumbel = GumbelTopK(tau=1.0).eval()
    hard = HardTopK()(scores, cand, 0.2)
    scores.requires_grad_()
    for _ in range(3):
        sel = gumbel(scores, cand, 0.2)
        assert torch.equal(sel.keep, hard.keep)
        assert torch.equal(sel.weight, torch.where(cand, hard.keep.float(), torch.ones(4, 20)))
    gumbel.train()
    torch.manual_seed(0)
    draws = [gumbel(scores, cand, 0.2) for _ in range(10)]
    assert any(not torch.equal(d.keep, hard.keep) for d in draws)
    for d in draws:  # still exact budgets and exact unit weights on kept tokens
        assert d.keep.sum(-1).tolist() == [4] * 4
        assert torch.equal(d.weight[d.keep], torch.ones(int(d.keep.sum())))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_bad_ratio_names_keep_ratio(bad):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got"):
        STETopK()(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), bad)
    with pytest.raises(ValueError, match="keep_ratio"):
        PerModalityTopK(HardTopK())(
            torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), bad, torch.ones(1, 3)
        )


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match=r"candidates shape \(2, 4\) must equal scores shape \(2, 5\)"):
        HardTopK()(torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r"modality shape \(2, 3\) must equal scores shape \(2, 5\)"):
        HardTopK()(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), 0.5, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"scores must have shape \(B, L\), got \(5,\)"):
        HardTopK()(torch.zeros(5), torch.ones(5, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="candidates must be a bool tensor"):
        HardTopK()(torch.zeros(1, 5), torch.ones(1, 5), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        HardTopK()(torch.tensor([[math.nan, 1.0]]), torch.ones(1, 2, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="modality=None"):
        PerModalityTopK(HardTopK())(torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        STETopK(tau=0)


@pytest.mark.parametrize("selector", [STETopK(), GumbelTopK(), PerModalityTopK(STETopK())])
def test_no_straight_through_weights_without_a_gradient_path(selector):
    """Under no_grad (evaluation) or on scores outside the graph the weights would be exactly 1 with
    nothing to backpropagate: none are computed, and the selection equals the hard Top-K's."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 12, generator=g, requires_grad=True)
    cand = torch.ones(2, 12, dtype=torch.bool)
    modality = torch.tensor([[1] * 6 + [2] * 6] * 2)
    selector.eval()
    hard = (PerModalityTopK(HardTopK()) if isinstance(selector, PerModalityTopK) else HardTopK())(
        scores, cand, 0.25, modality)
    with torch.no_grad():
        sel = selector(scores, cand, 0.25, modality)
    assert sel.weight is None and torch.equal(sel.keep, hard.keep)
    detached = selector(scores.detach(), cand, 0.25, modality)
    assert detached.weight is None and torch.equal(detached.keep, hard.keep)
    live = selector(scores, cand, 0.25, modality)
    assert live.weight is not None and live.weight.requires_grad and torch.equal(live.keep, hard.keep)
