"""AlignmentRun manifests and waiting helpers for the operator tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any


def tiny_run(name: str, tiny: dict[str, str], bucket: str, endpoint: str, *, iterations: int = 2,
             secret: str | None = None, heldout: bool = True, **spec: Any) -> dict[str, Any]:
    """A tiny cluster run: the offline tiny model and data, S3 storage; CPU-lean settings."""
    doc: dict[str, Any] = {
        "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "model": {"sft": tiny["model"]},
            "data": {"seed": tiny["seed"], "prompts": tiny["prompts"],
                     **({"heldout": tiny["heldout"]} if heldout else {})},
            "iterations": {"count": iterations, "promptsPerIteration": 8},
            "generation": {"maxNewTokens": 8, "backend": "transformers"},
            "training": {"learningRate": 1e-4, "seedEpochs": 1, "batchSize": 4, "maxLength": 96,
                         "maxPromptLength": 48},
            "storage": {"uri": f"s3://{bucket}/runs", "endpoint": endpoint, "region": "us-east-1",
                        **({"secretRef": {"name": secret}} if secret else {})},
            "maxRetriesPerStage": 1,
        },
    }
    doc["spec"].update(spec)
    return doc


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def phase(cluster, name: str) -> str | None:
    run = cluster.run(name)
    return (run or {}).get("status", {}).get("phase")


STAGES_2_ITER = ["iter-00/validate", "iter-00/seed-train", "iter-00/evaluate"] + [
    f"iter-{i:02d}/{s}" for i in (1, 2) for s in ("generate", "judge", "train", "evaluate")]
