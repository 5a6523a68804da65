"""The SPA self-refinement loss against DESIGN §3, recomputed by hand with `math` on hand-made numbers."""

from __future__ import annotations

import math

import pytest
import torch
from by_hand import quantile
from spa_workers.spa_loss import (
    MarginWindow,
    completion_logps,
    dpo_margin,
    extrapolated_logits,
    refined_dpo_losses,
    self_refinement_losses,
    warmup_alpha,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def plain(bm: float) -> float:
    """−log σ(β·m)"""
    return -log_sigmoid(bm)


def smoothed(bm: float, alpha: float) -> float:
    """−(1−α)·log σ(β·m) − α·log σ(−β·m)"""
    return -(1 - alpha) * log_sigmoid(bm) - alpha * log_sigmoid(-bm)


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_window_is_a_fifo_and_its_threshold_the_k_quantile():
    w = MarginWindow(size=5, quantile=0.25)
    w.push(t([5.0, 1.0, 4.0]))
    w.push([2.0, 3.0])
    assert w.values() == [5.0, 1.0, 4.0, 2.0, 3.0]
    assert w.threshold() == pytest.approx(2.0)  # sorted 1 2 3 4 5, position 0.25·4 = 1
    w.push([10.0, 0.5])  # evicts 5 and 1
    assert w.values() == [4.0, 2.0, 3.0, 10.0, 0.5]
    assert w.threshold() == pytest.approx(quantile([4.0, 2.0, 3.0, 10.0, 0.5], 0.25)) == pytest.approx(2.0)
    w2 = MarginWindow(size=4, quantile=0.1)
    w2.push([0.0, 1.0, 2.0, 3.0])
    assert w2.threshold() == pytest.approx(0.3)  # between the two smallest: 0 + 0.3·(1 − 0)
    # state round trip (checkpoints)
    w3 = MarginWindow(size=5, quantile=0.25)
    w3.load_state_dict(w.state_dict())
    assert w3.values() == w.values() and w3.threshold() == w.threshold()


def test_empty_window_has_no_threshold_and_nobody_is_low_confidence():
    """The first optimiser step: the window is empty, so no sample is judged low-confidence (DESIGN §3)."""
    w = MarginWindow(size=10, quantile=0.5)
    assert w.threshold() is None
    losses, stats = self_refinement_losses(t([3.0, -1.0]), None, beta=1.0, alpha=0.5, threshold=w.threshold())
    assert stats.low_confidence.tolist() == [False, False] and stats.refined_fraction == 0.0
    assert losses.tolist() == pytest.approx([plain(3.0), plain(-1.0)], rel=1e-12)


def test_warmup_alpha():
    # first 20% of 10 optimiser steps (steps 0 and 1) have α = 0
    assert [warmup_alpha(s, 10, 0.2, 0.1) for s in range(4)] == [0.0, 0.0, 0.1, 0.1]
    assert warmup_alpha(0, 10, 0.0, 0.3) == 0.3


def test_loss_after_warmup_matches_the_formula_and_threshold_comes_from_the_window_before_the_batch():
    beta, alpha = 0.5, 0.2
    window = MarginWindow(size=4, quantile=0.5)
    window.push([0.1, 0.4, 0.8, 1.2])  # earlier batches' β·m̃: median 0.6
    # policy / reference summed log-probs → m = (pc − pr) − (rc − rr)
    pc, pr = t([-10.0, -12.0, -9.0]), t([-11.0, -10.0, -9.5])
    rc, rr = t([-10.5, -11.0, -9.2]), t([-10.0, -10.5, -9.1])
    m = dpo_margin(pc, pr, rc, rr)
    m_hand = [(-10 + 11) - (-10.5 + 10), (-12 + 10) - (-11 + 10.5), (-9 + 9.5) - (-9.2 + 9.1)]
    assert m.tolist() == pytest.approx(m_hand)  # [1.5, -1.5, 0.6]
    losses, stats = self_refinement_losses(
        m.clone().requires_grad_(), None, beta=beta, alpha=alpha, threshold=window.threshold()
    )
    # λ = 0: m̃ = m; scores β·m = [0.75, −0.75, 0.3]; threshold = median of the window BEFORE this batch = 0.6
    assert stats.threshold == pytest.approx(0.6)
    assert window.values() == [0.1, 0.4, 0.8, 1.2]  # the loss leaves the window alone: the step pushes, once
    expected = [plain(0.75), smoothed(-0.75, alpha), smoothed(0.3, alpha)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert stats.low_confidence.tolist() == [False, True, True]
    assert stats.refined_fraction == pytest.approx(2 / 3)
    assert stats.reward_accuracy == pytest.approx(2 / 3)
    # the caller pushes the step's scores once the step is over: the oldest three leave the FIFO
    window.push(stats.scores)
    assert window.values() == pytest.approx([1.2, 0.75, -0.75, 0.3])
    # and the gradient flows through m
    losses.sum().backward()


def test_warmup_means_plain_dpo_even_for_low_confidence_samples():
    beta = 0.1
    window = MarginWindow(size=8, quantile=0.5)
    window.push([5.0, 6.0])
    m = t([2.0, -3.0, 80.0])  # β·m = 0.2, −0.3, 8.0: the first two are below the threshold 5.5
    losses, stats = self_refinement_losses(m, None, beta=beta, alpha=0.0, threshold=window.threshold())
    assert stats.low_confidence.tolist() == [True, True, False]
    assert stats.refined_fraction == 0.0  # flagged, but nothing smoothed while α = 0
    assert losses.tolist() == pytest.approx([plain(0.2), plain(-0.3), plain(8.0)], rel=1e-12)


def test_extrapolated_margin_decides_who_is_low_confidence_but_the_loss_uses_m():
    beta, alpha = 1.0, 0.1
    window = MarginWindow(size=4, quantile=0.5)
    window.push([0.0, 0.0, 1.0, 1.0])  # threshold 0.5
    m = t([1.0, 1.0])
    m_tilde = t([0.2, 2.0])  # first sample looks confident by m but not by m̃
    losses, stats = self_refinement_losses(m, m_tilde, beta=beta, alpha=alpha, threshold=window.threshold())
    assert stats.threshold == pytest.approx(0.5)
    assert stats.low_confidence.tolist() == [True, False]
    assert losses.tolist() == pytest.approx([smoothed(1.0, alpha), plain(1.0)], rel=1e-12)
    assert stats.scores.tolist() == pytest.approx([0.2, 2.0])  # what the window gets: β·m̃, not β·m


def test_gathered_scores_and_one_threshold_for_all_ranks():
    """With a gather, the statistics hold every rank's scores; each rank's mask covers only its own samples."""
    other_rank = t([-4.0, -3.0])
    window = MarginWindow(size=16, quantile=0.5)
    window.push([-1.0, 1.5, 3.0])  # median 1.5
    m = t([1.0, 2.0])

    def gather(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, other_rank.to(x.dtype)])

    losses, stats = self_refinement_losses(m, None, beta=1.0, alpha=0.5, threshold=window.threshold(),
                                           gather=gather)
    assert stats.threshold == pytest.approx(1.5)
    assert stats.scores.tolist() == [1.0, 2.0, -4.0, -3.0] and stats.low_confidence.tolist() == [True, False, True,
                                                                                                   True]
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx([smoothed(1.0, 0.5), plain(2.0)], rel=1e-12)


def test_refined_losses_vectorised_formula():
    logits = t([-2.0, 0.0, 3.0])
    low = torch.tensor([True, False, True])
    out = refined_dpo_losses(logits, low, 0.25)
    assert out.tolist() == pytest.approx([smoothed(-2.0, 0.25), plain(0.0), smoothed(3.0, 0.25)], rel=1e-12)


def _log_softmax_at(logits: list[float], k: int) -> float:
    return logits[k] - math.log(sum(math.exp(v) for v in logits))


def test_extrapolated_logits_give_the_expected_margin_by_hand():
    """Vocabulary of 3, identity LM heads; two answers of two tokens; m̃ from h̃ = (1+λ)h_θ − λh_ref by hand."""
    lam = 0.5
    # (batch=2 rows: chosen then rejected, T=3 positions, V=3); position 0 is prompt (label −100)
    hp = t(
        [
            [[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.3, -1.0, 2.0]],
            [[0.0, 0.0, 0.0], [0.0, 1.0, 1.5], [2.0, 0.1, -0.4]],
        ]
    )
    hr = t(
        [
            [[9.0, 9.0, 9.0], [0.5, 1.0, 1.0], [0.0, 0.0, 1.0]],
            [[9.0, 9.0, 9.0], [1.0, 0.0, 0.5], [1.0, 1.0, 0.0]],
        ]
    )
    labels = torch.tensor([[-100, 1, 2], [-100, 2, 0]])
    assert extrapolated_logits(hp, hr, lam)[0, 1].tolist() == pytest.approx([1.25, 2.5, 0.25])

    def by_hand(row: int) -> tuple[float, float]:
        ref = ext = 0.0
        for pos in (1, 2):
            k = int(labels[row, pos])
            p, r = hp[row, pos].tolist(), hr[row, pos].tolist()
            ref += _log_softmax_at(r, k)
            ext += _log_softmax_at([(1 + lam) * a - lam * b for a, b in zip(p, r, strict=True)], k)
        return ref, ext

    (rc, ec), (rr, er) = by_hand(0), by_hand(1)
    ref_lp, ext_lp = completion_logps(hp, hr, lambda h: h, lambda h: h, labels, lam, chunk_tokens=1)
    assert ref_lp.tolist() == pytest.approx([rc, rr], rel=1e-6)
    assert ext_lp.tolist() == pytest.approx([ec, er], rel=1e-6)
    m_tilde = dpo_margin(ext_lp[0], ext_lp[1], ref_lp[0], ref_lp[1])
    assert float(m_tilde) == pytest.approx((ec - er) - (rc - rr), rel=1e-6)
    # chunk size does not matter
    ref2, ext2 = completion_logps(hp, hr, lambda h: h, lambda h: h, labels, lam, chunk_tokens=1000)
    assert torch.allclose(ref2, ref_lp) and torch.allclose(ext2, ext_lp)


def test_lambda_zero_extrapolation_is_the_policy_itself():
    gen = torch.Generator().manual_seed(0)
    hp, hr = torch.randn(2, 4, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    _, ext = completion_logps(hp, hr, lambda h: h, lambda h: h, labels, 0.0, chunk_tokens=2)
    policy, _ = completion_logps(hp, hp, lambda h: h, lambda h: h, labels, 0.0)
    mask = labels != -100
    by_torch = (
        torch.log_softmax(hp, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    ).sum(1)
    assert torch.allclose(ext, by_torch.float(), atol=1e-6) and torch.allclose(policy, ext)
