"""What the train stage adds to the distributed engines (accelerate's FSDP2 and DeepSpeed under TRL), and how it
proves they are active: FSDP on CPU where accelerate would fall back to DDP, the frozen reference sharded per
layer like the policy, CPU-RAM-efficient loading without a zero-filled copy per rank, the optimiser step's real
samples when accelerate pads the last batch, and the sharding report each rank prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """One optimiser step's micro-batches: how many of each micro-batch's gathered pairs are real. accelerate's
    `even_batches` completes the epoch's last global micro-batch with samples from the epoch's start; the sampler
    hands out consecutive batches in rank order, so in the rank-ordered gather the real pairs come first and the
    padding last."""

    real: tuple[int, ...]  # real pairs in each micro-batch, all processes together
    processes: int

    @classmethod
    def of(cls, local: list[int], processes: int, remainder: int) -> StepPlan:
        """`local`: pairs per process in each micro-batch; `remainder`: accelerate's count of real pairs in the
        epoch's last global micro-batch when this step holds it (0: that batch is full), -1 when it does not."""
        real = [n * processes for n in local]
        if real and remainder > 0:
            real[-1] = min(real[-1], remainder)
        return cls(tuple(real), processes)

    @property
    def total(self) -> int:
        return sum(self.real)

    def weights(self, micro: int, rank: int, n_local: int):
        """(this process's real-pair mask, loss scale) for micro-batch `micro`: summing the masked per-pair losses
        times the scale gives, after the Trainer's division by the step's micro-batch count and the gradient
        reduction's mean over processes, the mean over the step's real pairs."""
        import torch

        real = self.real[micro] if micro < len(self.real) else n_local * self.processes
        mine = min(max(real - rank * n_local, 0), n_local)
        scale = self.processes * len(self.real) / max(self.total, 1)
        return (torch.arange(n_local) < mine).float(), scale


def force_fsdp(accelerator) -> None:
    """Make accelerate's (process-wide) state FSDP where accelerate itself would not: on CPU (see launch.py).

    accelerate builds the FSDP plugin from the launcher's FSDP_* environment but drops it when the distributed
    type is MULTI_CPU; this puts it back, so that `prepare` shards with FSDP2 over gloo.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()


def shard_reference(accelerator, reference) -> None:
    """Shard the frozen reference with FSDP2 the way accelerate shards the policy: one unit per decoder layer, so a
    reference forward gathers one layer at a time (TRL shards it at its root only, which gathers the whole model
    for every forward), and, with CPU-RAM-efficient loading, every rank's shards filled from rank 0's weights
    (the other ranks loaded none). Done in place, before TRL would wrap it (it leaves an FSDP module alone)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    reference.requires_grad_(False)  # frozen: kept in its stored dtype (accelerate upcasts trainable ones to fp32)
    prepared = fsdp2_prepare_model(accelerator, reference)
    if prepared is not reference:
        raise RuntimeError("accelerate's FSDP2 preparation replaced the reference model instead of sharding it")


def release_zeros(model) -> None:
    """Under CPU-RAM-efficient loading transformers gives a rank that read no weights zero-filled parameters of the
    whole model (benchmarks/results/load_memory.md): replace them by meta tensors at once, so that such a rank holds
    no copy (29 GB less per rank at 7B for policy and reference); accelerate fills its shards from rank 0 when it
    shards the model. Buffers stay: accelerate re-registers the non-persistent ones (rotary frequencies) from them."""
    import torch

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                              requires_grad=param.requires_grad)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def sharding_report(module) -> tuple[int, int, int, int]:
    """(parameters, of them DTensor, local elements, global elements) of a (possibly FSDP-wrapped) module."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    local = sum(_local(p).numel() for p in params)
    return len(params), len(dtensors), local, sum(p.numel() for p in params)


def fsdp_units(module) -> int:
    """How many submodules (the root included) are FSDP2 units: one per decoder layer plus embedding, tail, root."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in module.modules())


def _local(param):
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def check_engine(trainer, strategy: str, rank: int, stage: str) -> None:
    """Prove the launcher's strategy is really active (accelerate falls back to DDP silently where it does not
    support one): under FSDP every parameter of policy and reference must be a DTensor shard, each decoder layer
    its own unit, and no rank's reference shard all zeros (its weights were broadcast from rank 0)."""
    if strategy == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise RuntimeError("--strategy deepspeed: accelerate did not enable DeepSpeed")
    if strategy != "fsdp":
        return
    import torch

    for name, module in (("policy", trainer.model_wrapped), ("reference", trainer.ref_model)):
        if module is None:
            continue
        n, sharded, local, total = sharding_report(module)
        units, layers = fsdp_units(module), trainer.model.config.num_hidden_layers
        with torch.no_grad():
            local_sq = sum(float(_local(p).double().pow(2).sum()) for p in module.parameters())
        print(
            f"{stage}: rank {rank}: fsdp {name}: {sharded}/{n} parameters are DTensor shards, "
            f"{local}/{total} elements local, {units} FSDP units for {layers} layers, local sum of squares "
            f"{local_sq:.9g}",
            file=sys.stderr,
        )
        if sharded != n:
            raise RuntimeError(f"--strategy fsdp: {n - sharded} of {n} {name} parameters are not sharded")
        if units <= layers:
            raise RuntimeError(f"--strategy fsdp: the {name} is not sharded per decoder layer ({units} FSDP units)")
        if local and local_sq == 0.0:
            raise RuntimeError(f"--strategy fsdp: rank {rank}'s {name} shard is all zeros: its weights were not "
                               "broadcast from rank 0")
