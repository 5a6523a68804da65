"""The launch configuration of multi-process training: strategy choice, exact optimiser batch, the
`accelerate launch` command line per strategy (incl. DeepSpeed ZeRO-3, which cannot run on CPU here), the
checkpoint cadence and how checkpoint files are shared out between a node's processes."""

from __future__ import annotations

import pytest
from spa_workers import checkpoints, engine, launch
from spa_workers.contract import StageInputError, TrainArgs


def args(**kw) -> TrainArgs:
    return TrainArgs(model="m", pairs="p.jsonl", output="/out", **kw)


@pytest.mark.parametrize(
    ("kw", "cuda", "expected"),
    [
        ({}, False, "none"),
        ({"processes": 2}, False, "fsdp"),  # full-parameter: sharded
        ({"processes": 2, "lora_r": 8}, True, "ddp"),  # LoRA: replicas
        ({"processes": 4, "nodes": 2, "strategy": "deepspeed"}, True, "deepspeed"),
        ({"processes": 1, "nodes": 2, "strategy": "ddp"}, False, "ddp"),
        ({"strategy": "fsdp"}, True, "fsdp"),  # one GPU, asked for: the bf16 sharded path (the GPU check)
        ({"strategy": "fsdp"}, False, "none"),  # one CPU process: nothing to shard over
        ({"strategy": "auto"}, True, "none"),
    ],
)
def test_strategy(kw, cuda, expected):
    assert launch.resolve_strategy(args(**kw), cuda) == expected


@pytest.mark.parametrize(
    ("kw", "cuda", "message"),
    [
        ({"processes": 2, "strategy": "zero"}, True, "--strategy zero: must be one of"),
        ({"processes": 2, "strategy": "deepspeed"}, False, "DeepSpeed only on GPUs"),
        ({"processes": 2, "strategy": "fsdp", "lora_r": 4}, True, "LoRA training runs with ddp"),
        ({"processes": 0}, True, "--processes 0"),
    ],
)
def test_bad_strategy_is_one_clear_line(kw, cuda, message):
    with pytest.raises(StageInputError, match=message):
        launch.resolve_strategy(args(**kw), cuda)


def test_optimiser_batch_is_exact():
    assert launch.batch_geometry(32, 0, 8) == (4, 1)
    assert launch.batch_geometry(32, 1, 4) == (1, 8)  # the official recipe: 1 x 8 accumulation x 4 GPUs
    assert launch.batch_geometry(32, 2, 1) == (2, 16)
    for batch, per_device, world in ((32, 0, 3), (32, 3, 2), (2, 0, 4)):
        with pytest.raises(StageInputError, match=f"--batch-size {batch} is not a multiple of {world} processes"):
            launch.batch_geometry(batch, per_device, world)


def _opts(argv: list[str]) -> dict[str, str | bool]:
    """`--flag value` / `--flag` pairs of the launcher's own options (before `-m spa_workers.cli`)."""
    own = argv[argv.index("accelerate.commands.launch") + 1 : argv.index("spa_workers.cli") - 1]
    out: dict[str, str | bool] = {}
    for i, tok in enumerate(own):
        if tok.startswith("--"):
            nxt = own[i + 1] if i + 1 < len(own) else "--"
            out[tok] = True if nxt.startswith("--") else nxt
    return out


def test_fsdp_launch_on_one_node(monkeypatch):
    for var in (launch.RENDEZVOUS_HOST_ENV, launch.RENDEZVOUS_PORT_ENV, launch.NODE_RANK_ENV):
        monkeypatch.delenv(var, raising=False)
    a = args(processes=8, batch_size=32)
    argv = launch.launch_command(a, launch.resolve_strategy(a, True), cuda=True)
    o = _opts(argv)
    assert o["--num_processes"] == "8" and o["--num_machines"] == "1" and o["--machine_rank"] == "0"
    assert o["--main_process_ip"] == "127.0.0.1" and o["--main_process_port"] == str(launch.DEFAULT_PORT)
    assert o["--use_fsdp"] is True and o["--fsdp_version"] == "2" and o["--fsdp_reshard_after_forward"] == "true"
    assert o["--fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and o["--fsdp_cpu_ram_efficient_loading"] == "true"
    assert o["--mixed_precision"] == "bf16" and o["--max_restarts"] == "0"
    assert o["--rdzv_backend"] == "static" and o["--rdzv_conf"] == "timeout=900"
    child = TrainArgs.from_argv(argv[argv.index("spa_workers.cli") + 2 :])
    assert child.strategy == "fsdp" and child.processes == 8 and child.batch_size == 32


def test_deepspeed_launch_across_nodes(monkeypatch):
    monkeypatch.setenv(launch.RENDEZVOUS_HOST_ENV, "train-0.train-svc")
    monkeypatch.setenv(launch.RENDEZVOUS_PORT_ENV, "29400")
    monkeypatch.setenv(launch.NODE_RANK_ENV, "1")
    monkeypatch.setenv(launch.RENDEZVOUS_TIMEOUT_ENV, "120")
    a = args(processes=4, nodes=2, strategy="deepspeed", batch_size=32, per_device_batch_size=1)
    o = _opts(launch.launch_command(a, launch.resolve_strategy(a, True), cuda=True))
    assert o["--num_processes"] == "8" and o["--num_machines"] == "2" and o["--machine_rank"] == "1"
    assert o["--main_process_ip"] == "train-0.train-svc" and o["--main_process_port"] == "29400"
    assert o["--use_deepspeed"] is True and o["--zero_stage"] == "3" and o["--zero3_save_16bit_model"] == "true"
    assert o["--gradient_accumulation_steps"] == "4"  # 1 per device x 4 x 8 processes = 32
    assert o["--deepspeed_multinode_launcher"] == "standard" and o["--rdzv_conf"] == "timeout=120"
    assert "--use_fsdp" not in o


def test_ddp_launch_on_cpu():
    a = args(processes=2, lora_r=4)
    o = _opts(launch.launch_command(a, launch.resolve_strategy(a, False), cuda=False))
    assert o["--multi_gpu"] is True and o["--mixed_precision"] == "no"
    assert "--use_fsdp" not in o and "--use_deepspeed" not in o


def test_only_an_unlaunched_multi_process_or_sharded_stage_launches(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.needs_launch(args(processes=2)) and launch.needs_launch(args(nodes=2))
    assert not launch.needs_launch(args())
    assert not launch.needs_launch(args(strategy="fsdp"))  # one process on this CUDA-less machine: no launcher
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.needs_launch(args(processes=2))  # already a rank


def test_checkpoint_cadence():
    now = [0.0]
    by_steps = checkpoints.Cadence(every_steps=3, every_minutes=0, clock=lambda: now[0])
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = checkpoints.Cadence(every_steps=0, every_minutes=2, clock=lambda: now[0])
    assert not by_time.due(1)
    now[0] = 119.0
    assert not by_time.due(2)
    now[0] = 120.0
    assert by_time.due(3)
    by_time.taken()
    now[0] = 200.0
    assert not by_time.due(4)
    assert not checkpoints.Cadence(0, 0).enabled
    assert checkpoints.Cadence(0, 60).enabled  # the default: hourly


def test_each_process_of_a_node_moves_its_share_of_the_files():
    files = [f"f{i}" for i in range(7)]
    shares = [checkpoints.my_share(files, r, 3) for r in range(3)]
    assert sorted(f for share in shares for f in share) == sorted(files)
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1 :])


def test_scratch_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(checkpoints.SCRATCH_ENV, str(tmp_path))
    a, b = checkpoints.scratch_dir("s3://b/run/iter-01/train"), checkpoints.scratch_dir("s3://b/run/iter-02/train")
    assert a.startswith(str(tmp_path)) and a != b
    assert a == checkpoints.scratch_dir("s3://b/run/iter-01/train")  # the same path for every rank of a node
    monkeypatch.setenv("GROUP_RANK", "1")
    assert checkpoints.scratch_dir("s3://b/run/iter-01/train") != a  # another node


def test_training_loads_the_policy_in_its_stored_dtype_on_gpu(tiny, tmp_path, monkeypatch):
    """bf16 stays bf16 on GPU (a 7B policy is 14.5 GB, not 29); CPU runs compute in float32."""
    import torch
    from spa_workers.modeling import load_model

    bf16 = str(tmp_path / "bf16")
    load_model(tiny["model"], dtype="bfloat16").save_pretrained(bf16)
    assert load_model(bf16, dtype="auto").dtype == torch.float32  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_model(bf16, dtype="auto").dtype == torch.bfloat16
    assert load_model(tiny["model"], dtype="auto").dtype == torch.float32  # stored in float32


def test_policy_dtype_keeps_float32_where_adam_updates_the_stored_weights():
    from spa_workers.train import policy_dtype

    assert policy_dtype(lora=False, strategy="fsdp") == "auto"  # fp32 masters are FSDP's upcast shards
    assert policy_dtype(lora=False, strategy="deepspeed") == "auto"  # ZeRO-3 keeps fp32 partitions
    assert policy_dtype(lora=True, strategy="ddp") == "auto"  # the base is frozen
    assert policy_dtype(lora=False, strategy="ddp") == "float32"
    assert policy_dtype(lora=False, strategy="none") == "float32"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "{tmp}/no-model"], "no-model: not found (no config.json)"),
        (["--batch-size", "5"], "--batch-size 5 is not a multiple of 2 processes"),
        (["--strategy", "megatron"], "--strategy megatron: must be one of"),
    ],
)
def test_bad_multi_process_input_fails_before_the_launch(tiny, tmp_path, extra, message):
    """One clear line and exit 2 from the single process, not a launcher's generic failure from every rank."""
    from spa_workers.contract import EXIT_BAD_INPUT
    from workerproc import run_worker

    argv = ["train", "--model", tiny["model"], "--pairs", tiny["seed"], "--output", str(tmp_path / "out"),
            "--processes", "2", *(x.replace("{tmp}", str(tmp_path)) for x in extra)]
    proc = run_worker(*argv)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "launching" not in proc.stderr


def _step_loss(plan: engine.StepPlan, losses: list[list[list[float]]]) -> float:
    """What the optimiser sees: per micro-batch and rank, Σ mask·loss·scale; the Trainer divides by the step's
    micro-batches and the gradient reduction averages over the processes."""
    total = 0.0
    for micro, per_rank in enumerate(losses):
        for rank, local in enumerate(per_rank):
            mask, scale = plan.weights(micro, rank, len(local))
            total += sum(m * v for m, v in zip(mask.tolist(), local, strict=True)) * scale
    return total / len(losses) / plan.processes


def test_an_optimiser_step_is_the_mean_over_its_real_pairs_whatever_the_layout():
    pairs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # a global batch of 8 with only 6 real pairs: the epoch's last step
    mean = sum(pairs) / 6
    pad = [9.0, 9.0]  # accelerate's even_batches padding: samples from the epoch's start, last in the gather
    one = engine.StepPlan.of([6], 1, -1)  # one process: no padding
    assert _step_loss(one, [[pairs]]) == pytest.approx(mean)
    two = engine.StepPlan.of([4], 2, 6)  # 2 processes x 4: rank 1 holds 5, 6 and the padding
    assert two.real == (6,) and _step_loss(two, [[pairs[:4], pairs[4:] + pad]]) == pytest.approx(mean)
    accum = engine.StepPlan.of([2, 2], 2, 2)  # 2 processes x 2, accumulation 2: the second micro-batch is ragged
    assert accum.real == (4, 2) and accum.total == 6
    assert _step_loss(accum, [[pairs[:2], pairs[2:4]], [pairs[4:], pad]]) == pytest.approx(mean)
    full = engine.StepPlan.of([2, 2], 2, 0)  # remainder 0: the last batch is full
    assert full.real == (4, 4)
