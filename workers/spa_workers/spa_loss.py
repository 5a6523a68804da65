"""SPA's noise-aware self-refinement loss (DESIGN §3; the official code's `distill` loss), in plain torch.

Notation: m = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)) is the DPO logit of a pair, m̃
the same margin of the *extrapolated* model whose logits are h̃ = (1+λ)·h_θ − λ·h_ref (λ = 0 gives m̃ = m). A
FIFO window keeps the last `window` per-sample scores β·m̃; its K-quantile is the threshold. A sample whose
score is below the threshold is low-confidence and trains on −(1−α)·log σ(β·m) − α·log σ(−β·m); the others on
the plain −log σ(β·m). α is 0 during the warm-up (the first `warmup_fraction` of optimiser steps).

Ordering, as in the official implementation (kingdy2002/SPA, `DPOTrainer.confidence_update` runs after the
batch's loss): an optimiser step's samples are judged against the threshold of the window *before* the step,
then the step's scores are pushed — once per optimiser step, from the gathered global batch (every process's
micro-batches, without the duplicates accelerate's `even_batches` pads the last batch with), so the thresholds do
not depend on how the batch is split over processes and accumulation steps (the caller, spa_trainer.py, does
the gathering and pushing). Two deliberate differences from that code: (1) the official threshold is 0 until
the window is full; here it is the quantile of whatever the window holds, and in the first optimiser step
(empty window) there is no threshold: no sample is low-confidence (α is 0 during the warm-up anyway); (2) the
quantile is `torch.quantile`'s linear interpolation rather than the mean of two order statistics.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def dpo_margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """m: the policy's chosen-minus-rejected log-ratio minus the reference's, per sample."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def warmup_alpha(step: int, total_steps: int, warmup_fraction: float, smoothing: float) -> float:
    """α for optimiser step `step` (0-based): 0 during the first `warmup_fraction` of the steps."""
    return 0.0 if step < warmup_fraction * total_steps else smoothing


class MarginWindow:
    """FIFO of the last `size` scores β·m̃; `threshold()` is their `quantile`-quantile."""

    def __init__(self, size: int, quantile: float) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.size, self.quantile = size, quantile
        self._values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> list[float]:
        return list(self._values)

    def push(self, values: Tensor | Iterable[float]) -> None:
        flat = values.detach().flatten().tolist() if isinstance(values, Tensor) else values
        self._values.extend(float(v) for v in flat)

    def threshold(self) -> float | None:
        """The window's quantile; None while the window is empty (nobody is low-confidence then)."""
        if not self._values:
            return None
        return float(torch.quantile(torch.tensor(list(self._values), dtype=torch.float64), self.quantile))

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "quantile": self.quantile, "values": self.values()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._values = deque((float(v) for v in state["values"]), maxlen=self.size)


def refined_dpo_losses(logits: Tensor, low_confidence: Tensor, alpha: float) -> Tensor:
    """Per-sample loss from the DPO logits β·m: smoothed by α where `low_confidence`, plain elsewhere."""
    plain = -F.logsigmoid(logits)
    if alpha == 0.0:
        return plain
    smoothed = -(1.0 - alpha) * F.logsigmoid(logits) - alpha * F.logsigmoid(-logits)
    return torch.where(low_confidence, smoothed, plain)


@dataclass
class RefinementStats:
    """What one micro-batch's refinement decided, over all processes' samples (gathered)."""

    threshold: float | None  # the threshold of this optimiser step (None: empty window, nobody low-confidence)
    alpha: float
    margins: Tensor  # β·m of every process's samples (gathered), float32 on CPU
    scores: Tensor  # β·m̃ of every process's samples (gathered)
    low_confidence: Tensor  # scores < threshold (gathered, bool)

    @property
    def refined_fraction(self) -> float:
        """Fraction of samples whose loss was actually smoothed (0 while α = 0)."""
        if self.alpha == 0.0 or self.low_confidence.numel() == 0:
            return 0.0
        return float(self.low_confidence.float().mean())

    @property
    def reward_accuracy(self) -> float:
        return float((self.margins > 0).float().mean()) if self.margins.numel() else 0.0


def _identity(t: Tensor) -> Tensor:
    return t


def low_confidence(scores: Tensor, threshold: float | None) -> Tensor:
    """scores < threshold; all False without a threshold."""
    if threshold is None:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores < threshold


def self_refinement_losses(
    margin: Tensor,
    extrapolated_margin: Tensor | None,
    *,
    beta: float,
    alpha: float,
    threshold: float | None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, RefinementStats]:
    """Per-sample SPA losses for this process's samples against this optimiser step's `threshold`, and the
    micro-batch's statistics over all processes. The window is not touched: the caller pushes the whole
    step's scores once the step is complete (`MarginWindow.push`).

    `margin` (m) carries the gradient; `extrapolated_margin` (m̃; None means λ = 0, m̃ = m) is used without
    it. `gather` concatenates a tensor across processes (identity when None).
    """
    gather = gather or _identity
    scores = beta * (margin if extrapolated_margin is None else extrapolated_margin).detach().float()
    losses = refined_dpo_losses(beta * margin, low_confidence(scores, threshold), alpha)
    all_scores = gather(scores).detach().float().cpu()
    all_margins = gather((beta * margin).detach().float()).float().cpu()
    stats = RefinementStats(
        threshold=threshold,
        alpha=alpha,
        margins=all_margins,
        scores=all_scores,
        low_confidence=low_confidence(all_scores, threshold),
    )
    return losses, stats


# --- λ-extrapolated log-probabilities ---


def extrapolated_logits(policy_logits: Tensor, ref_logits: Tensor, lam: float) -> Tensor:
    """h̃ = (1+λ)·h_θ − λ·h_ref."""
    return (1.0 + lam) * policy_logits - lam * ref_logits


def completion_logps(
    policy_hidden: Tensor,
    ref_hidden: Tensor,
    policy_head: Callable[[Tensor], Tensor],
    ref_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    lam: float,
    chunk_tokens: int = 256,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled tokens under the reference and under the extrapolated model.

    `*_hidden` are (B, T, H) final hidden states aligned with `labels` (B, T) — i.e. already shifted so
    position t predicts labels[:, t]; -100 marks positions to ignore. The heads map (N, H) hidden states to
    (N, V) logits. Only labelled positions are projected, `chunk_tokens` at a time, so the (B, T, V) logits
    never exist at once. Returns (ref, extrapolated), each (B,) float32. Call it under `torch.no_grad()`.
    """
    mask = labels != -100
    rows = mask.nonzero(as_tuple=True)[0]
    pol, ref, tgt = policy_hidden[mask], ref_hidden[mask], labels[mask]
    ref_sum = torch.zeros(labels.size(0), dtype=torch.float32, device=labels.device)
    ext_sum = torch.zeros_like(ref_sum)
    for start in range(0, tgt.numel(), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        h_pol = policy_head(pol[sl]).float()
        h_ref = ref_head(ref[sl]).float()
        idx = tgt[sl].unsqueeze(-1)
        ref_lp = torch.log_softmax(h_ref, dim=-1).gather(-1, idx).squeeze(-1)
        ext_lp = torch.log_softmax(extrapolated_logits(h_pol, h_ref, lam), dim=-1).gather(-1, idx).squeeze(-1)
        ref_sum.index_add_(0, rows[sl], ref_lp)
        ext_sum.index_add_(0, rows[sl], ext_lp)
    return ref_sum, ext_sum
