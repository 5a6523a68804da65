"""One process per GPU for the train stages: `spa-worker train --processes N --nodes M --strategy S` re-runs
itself under `accelerate launch` (torchrun's elastic agent underneath) when it is not already under a launcher.

The launcher is accelerate's; this module only chooses its flags:
- strategy `auto` → `fsdp` (FSDP2 full-shard) for full-parameter training, `ddp` for LoRA, `none` for 1 process;
  `deepspeed` → ZeRO-3 (the official SPA recipe), which accelerate runs only on accelerators.
- rendezvous: static, at SPA_RENDEZVOUS_HOST:SPA_RENDEZVOUS_PORT (127.0.0.1:29500 by default), node rank =
  JOB_COMPLETION_INDEX (an Indexed Job's pod index); `--max_restarts 0`, so a dead rank ends the whole launch
  (the executor retries the stage, which resumes from its checkpoint) instead of leaving the others waiting.
- bf16 on GPU.

accelerate 1.15 turns FSDP on only for accelerator device types: on CPU it silently runs DDP. So whenever the
launcher asked for FSDP (ACCELERATE_USE_FSDP in the ranks' environment) the trainer (spa_trainer.py) switches
accelerate's state to FSDP itself where accelerate did not, and checks that the parameters really are DTensor
shards: CPU runs take the GPU path. CPU-RAM-efficient loading is on (only each node's local rank 0 reads the
weights; transformers gives the other ranks zeros, and accelerate fills every rank's shards from global rank 0):
accelerate does that for the policy, spa_trainer.py for the reference, which TRL would shard without it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from spa_workers.contract import StageInputError, TrainArgs

STRATEGIES = ("auto", "fsdp", "deepspeed", "ddp")
RENDEZVOUS_HOST_ENV = "SPA_RENDEZVOUS_HOST"
RENDEZVOUS_PORT_ENV = "SPA_RENDEZVOUS_PORT"
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"
DEFAULT_PORT = 29500
# Seconds the static rendezvous waits for every node to join (pods of a gang start minutes apart while images
# pull). The collective timeout is the process group's: collectives.py.
RENDEZVOUS_TIMEOUT_ENV = "SPA_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 900


def world_size(args: TrainArgs) -> int:
    return args.processes * args.nodes


def resolve_strategy(args: TrainArgs, cuda: bool) -> str:
    """The strategy the stage runs with: one of fsdp, deepspeed, ddp, none. Bad combinations are input errors."""
    if args.processes < 1 or args.nodes < 1:
        raise StageInputError(f"--processes {args.processes} / --nodes {args.nodes}: both must be at least 1")
    if args.strategy not in STRATEGIES:
        raise StageInputError(f"--strategy {args.strategy}: must be one of {', '.join(STRATEGIES)}")
    if world_size(args) == 1:  # one GPU: a sharding engine only when asked for (the bf16 path, e.g. the GPU check)
        return args.strategy if args.strategy in ("fsdp", "deepspeed") and cuda and not args.lora_r else "none"
    strategy = args.strategy
    if strategy == "auto":
        strategy = "ddp" if args.lora_r > 0 else "fsdp"
    if strategy in ("fsdp", "deepspeed") and args.lora_r > 0:
        raise StageInputError(f"--strategy {strategy} with --lora-r {args.lora_r}: LoRA training runs with ddp")
    if strategy == "deepspeed" and not cuda:
        raise StageInputError("--strategy deepspeed: accelerate runs DeepSpeed only on GPUs; use fsdp or ddp on CPU")
    return strategy


def batch_geometry(batch_size: int, per_device: int, processes: int) -> tuple[int, int]:
    """(per-device batch, gradient-accumulation steps) with per_device·accum·processes == batch_size exactly.

    per_device 0 splits the batch evenly over the processes without accumulation.
    """
    if batch_size < 1 or per_device < 0:
        raise StageInputError(f"--batch-size {batch_size} / --per-device-batch-size {per_device}: must be positive")
    per_device = per_device or batch_size // processes
    if per_device < 1 or batch_size % (per_device * processes):
        raise StageInputError(
            f"--batch-size {batch_size} is not a multiple of {processes} processes x --per-device-batch-size "
            f"{per_device or 1}: the optimiser batch could not be exactly {batch_size}"
        )
    return per_device, batch_size // (per_device * processes)


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


def needs_launch(args: TrainArgs) -> bool:
    if under_launcher():
        return False
    if world_size(args) > 1:
        return True
    import torch

    return resolve_strategy(args, torch.cuda.is_available()) != "none"


def launch_command(args: TrainArgs, strategy: str, cuda: bool) -> list[str]:
    """The argv of `accelerate launch` running this stage with `strategy` on every rank."""
    world = world_size(args)
    _, accum = batch_geometry(args.batch_size, args.per_device_batch_size, world)
    env = os.environ
    argv = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(world),
        "--num_machines", str(args.nodes),
        "--machine_rank", env.get(NODE_RANK_ENV, "0"),
        "--main_process_ip", env.get(RENDEZVOUS_HOST_ENV, "127.0.0.1"),
        "--main_process_port", env.get(RENDEZVOUS_PORT_ENV, str(DEFAULT_PORT)),
        "--rdzv_backend", "static",
        "--rdzv_conf", f"timeout={env.get(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)}",
        "--max_restarts", "0",
        "--mixed_precision", "bf16" if cuda else "no",
        "--dynamo_backend", "no",
    ]
    if strategy == "fsdp":
        argv += [
            "--use_fsdp",
            "--fsdp_version", "2",
            "--fsdp_reshard_after_forward", "true",  # full shard
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
            "--fsdp_state_dict_type", "SHARDED_STATE_DICT",  # checkpoints: every rank writes its own shard
            "--fsdp_cpu_ram_efficient_loading", "true",  # rank 0 loads the weights, the others receive shards
            "--fsdp_offload_params", "false",
            "--fsdp_activation_checkpointing", "false",  # the Trainer's gradient checkpointing does it on GPU
        ]
    elif strategy == "deepspeed":
        argv += [
            "--use_deepspeed",
            "--zero_stage", "3",
            "--zero3_init_flag", "true",
            "--zero3_save_16bit_model", "true",  # the final save gathers 16-bit weights
            "--offload_optimizer_device", "none",
            "--offload_param_device", "none",
            "--gradient_accumulation_steps", str(accum),
            "--deepspeed_multinode_launcher", "standard",  # torchrun rendezvous, as for the other strategies
        ]
    else:
        argv.append("--multi_gpu")  # DDP; the ranks pick gloo themselves when there is no GPU
    child = replace(args, strategy=strategy)  # the ranks (and the manifest's args) see the resolved strategy
    return [*argv, "-m", "spa_workers.cli", *child.to_argv()]


def exec_launcher(args: TrainArgs) -> None:
    """Replace this process by `accelerate launch` (signals from the kubelet then reach the launcher directly)."""
    import torch

    cuda = torch.cuda.is_available()
    argv = launch_command(args, resolve_strategy(args, cuda), cuda)
    print(f"{args.stage}: launching {world_size(args)} processes: {' '.join(argv[1:5])} ...", file=sys.stderr)
    sys.stderr.flush()
    os.execv(argv[0], argv)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def active_strategy() -> str:
    """What a rank runs under, as its launcher set it up (ours, or a user's own `accelerate launch`)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"
