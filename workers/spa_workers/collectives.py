"""The process group of a multi-process stage, and how its ranks wait for one another's long work.

- The first process group (accelerate's PartialState, created by the runner before anything else) gets the
  configured collective timeout, SPA_COLLECTIVE_TIMEOUT_S (1800 s): set later (the Trainer's `ddp_timeout`) it would
  be ignored, and NCCL's own default (10 minutes) would apply.
- Work that one rank does for minutes — hashing and uploading the final model, uploading or fetching its share of a
  checkpoint, deleting old checkpoints — is never waited for inside a collective of that group: the others wait in
  `wait_long`, a barrier on a separate gloo group whose timeout is SPA_LONG_WAIT_TIMEOUT_S (6 h), which no NCCL
  watchdog watches. A rank that dies meanwhile still ends the launch (torchrun stops the others).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

COLLECTIVE_TIMEOUT_ENV = "SPA_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800
LONG_WAIT_TIMEOUT_ENV = "SPA_LONG_WAIT_TIMEOUT_S"
DEFAULT_LONG_WAIT_TIMEOUT_S = 6 * 3600

_long_wait_group = None


def collective_timeout_s() -> float:
    return float(os.environ.get(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S))


def long_wait_timeout_s() -> float:
    return float(os.environ.get(LONG_WAIT_TIMEOUT_ENV, DEFAULT_LONG_WAIT_TIMEOUT_S))


def distributed_state():
    """accelerate's PartialState when launched as several processes (its process group created now, with the
    collective timeout), else None (and no torch import)."""
    global _long_wait_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # The first PartialState fixes the backend for the whole process: without CUDA it must be told to use the
    # CPU (gloo), otherwise accelerate sets up no distributed state at all and every rank would train alone.
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cpu = forced_cpu or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=collective_timeout_s()))
    if _long_wait_group is None:
        _long_wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_wait_timeout_s()))
        print(f"rank {state.process_index}: process group {dist.get_backend()}, collective timeout "
              f"{group_timeout_s():g} s; long waits {group_timeout_s(_long_wait_group):g} s", file=sys.stderr)
    return state


def group_timeout_s(group=None) -> float:
    """The timeout a process group was really created with (its backend's options), in seconds; -1 if unknown."""
    import torch
    import torch.distributed as dist

    pg = group or dist.group.WORLD
    for device in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (AttributeError, RuntimeError, ValueError):
            continue
    return -1.0


def wait_long() -> None:
    """Every rank waits here while one or more do long work outside any collective of the training group."""
    if _long_wait_group is None:
        return
    import torch.distributed as dist

    dist.barrier(group=_long_wait_group)
