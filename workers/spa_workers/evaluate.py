"""evaluate: how often the policy's implicit reward (against the reference) agrees with held-out human labels.

A gold pair agrees when r(x, chosen) > r(x, rejected), r = β·(log π_policy − log π_reference) as the
judge computes it (`scoring.implicit_rewards`); a tie counts as disagreement. Pairs whose prompt is too
long to train on are left out and counted. Manifest: counts `pairs`, `skipped_long_prompt`; metrics
`heldout_agreement` and `margin_mean` (the mean of r(chosen) − r(rejected)).
"""

from __future__ import annotations

from statistics import fmean

from spa_workers.contract import EvaluateArgs, ManifestKeys, StageInputError
from spa_workers.data import load_pairs
from spa_workers.runner import StageWork, run_stage
from spa_workers.scoring import Limits, check_backend, implicit_rewards


def _body(work: StageWork) -> None:
    args: EvaluateArgs = work.args  # type: ignore[assignment]
    check_backend(args.backend)
    pairs = load_pairs(args.heldout)
    items = [item for p in pairs for item in ((p.prompt, p.chosen), (p.prompt, p.rejected))]
    limits = Limits(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                    max_batch_tokens=args.max_batch_tokens)
    rewards = implicit_rewards(args.policy, args.reference, items, args.beta, limits, args.backend,
                               lambda done, total: work.progress(done, total, unit="answers"))
    # a prompt too long to train on leaves both of its answers unscored
    margins = [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)
               if c is not None and r is not None]
    if not margins:
        raise StageInputError(f"{args.heldout}: every prompt is longer than max_prompt_length "
                              f"({args.max_prompt_length} tokens) or max_length ({args.max_length})")
    work.counts[ManifestKeys.PAIRS] = len(margins)
    work.counts[ManifestKeys.SKIPPED_LONG_PROMPTS] = len(pairs) - len(margins)
    work.metrics[ManifestKeys.HELDOUT_AGREEMENT] = fmean(m > 0 for m in margins)
    work.metrics[ManifestKeys.MARGIN] = fmean(margins)


def run(args: EvaluateArgs) -> int:
    return run_stage(args, _body)
