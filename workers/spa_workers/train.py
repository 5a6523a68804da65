"""The `train` and `seed-train` stages: DPO with TRL, plus SPA's self-refinement (DESIGN §3, `spa_loss`).

- seed-train: plain sigmoid DPO from `--model` on gold pairs against `--reference` (default: `--model`);
  refinement is always off.
- train: DPO initialised from `--model` with `--model` itself as the reference (unless `--reference` names
  another model), with self-refinement when `--refinement` (the default) and λ-extrapolated noise detection
  when `--extrapolation` > 0.

`--pairs` is a gold file (JSONL/Parquet) or a judge stage's output dir (`pairs.jsonl` of every finished
shard). Outputs under the stage dir: `model/` (a plain HF model in the input model's dtype; a LoRA adapter is
merged first; under FSDP/ZeRO-3 all ranks gather it and rank 0 writes), `train_log.jsonl` (one line per
optimiser step).

`--processes N --nodes M --strategy S`: more than one process in all → the stage re-runs itself under
`accelerate launch` (launch.py); the optimiser batch is `--batch-size` exactly (micro-batch × accumulation ×
processes). Checkpoints (checkpoints.py) every `--checkpoint-every-steps` / `--checkpoint-every-minutes`, sharded
under FSDP, go to `<output>/checkpoints/checkpoint-<step>/` with a `_COMPLETE` marker written last; a restarted
stage resumes from the newest complete one (FSDP: with any process count). They are deleted once the manifest is
written and are never part of it.

Test hooks: with `SPA_TRAIN_STOP_AFTER_STEPS=N` every process exits abruptly (code 75, no cleanup, like a killed
pod) right after the first checkpoint at or after step N has been stored; with `SPA_TRAIN_STOP_RANK=R` as well,
only rank R dies, by SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from spa_workers import checkpoints, collectives, contract, data, engine, launch, modeling, runner, storage, usage
from spa_workers.contract import Ledger, ManifestKeys, StageInputError, TrainArgs
from spa_workers.spa_trainer import Refinement, make_trainer, policy_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LOG_FILE = "train_log.jsonl"
STOP_AFTER_ENV = "SPA_TRAIN_STOP_AFTER_STEPS"
STOP_RANK_ENV = "SPA_TRAIN_STOP_RANK"
STOP_EXIT_CODE = 75
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq")


def run(args: TrainArgs) -> int:
    if launch.needs_launch(args) and not storage.exists(storage.join(args.output, contract.MANIFEST)):
        # Bad input fails here, in one process, with its own exit code (the launcher would turn a rank's into 1);
        # remote models are fetched once, here, for all the ranks of this node.
        load_training_pairs(args.pairs)
        launch.batch_geometry(args.batch_size, args.per_device_batch_size, launch.world_size(args))
        for uri in {args.model, args.reference or args.model}:
            modeling.resolve_model(uri)
        usage.hand_over()  # the ranks' ledger counts this process's downloads and time too
        launch.exec_launcher(args)  # does not return
    return runner.run_stage(args, lambda work: _train(args, work))


# --- inputs ---


def load_training_pairs(uri: str) -> list[data.PreferencePair]:
    """Pairs from a gold file, or from every finished shard of a judge stage's output dir."""
    if uri.lower().rstrip("/").endswith(_DATA_SUFFIXES):
        return data.load_pairs(uri)
    pairs: list[data.PreferencePair] = []
    for shard in contract.finished_shard_dirs(uri):
        path = storage.join(shard, contract.PAIRS_FILE)
        rows = data.read_records(path)  # a shard may legitimately hold no pairs (all dropped by the judge)
        pairs += [data.parse_pair(r, f"{path}: row {n}") for n, r in enumerate(rows, start=1)]
    if not pairs:
        raise StageInputError(f"{uri}: the judge produced no pairs")
    return pairs


def training_rows(
    pairs: list[data.PreferencePair], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int
) -> tuple[list[dict[str, Any]], int]:
    """TRL conversational rows, without the pairs whose prompt is longer than `max_prompt_length` tokens."""
    rows, skipped = [], 0
    for p in pairs:
        if len(modeling.encode_prompt(tokenizer, p.prompt)) > max_prompt_length:
            skipped += 1
            continue
        rows.append(
            {
                "prompt": p.prompt,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
        )
    return rows, skipped


# --- the stage ---


def _quiet() -> None:
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def _output_dtype(model_dir: str) -> str:
    """The dtype the input model was stored in: the trained model is saved the same way."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _summarise(log: list[dict[str, Any]]) -> dict[str, float]:
    """Manifest metrics: sample-weighted means over the run; the threshold is the last one."""
    n = sum(r["samples"] for r in log)
    if n == 0:
        return {ManifestKeys.STEPS: 0.0}
    out = {
        ManifestKeys.LOSS: sum(r["loss"] * r["samples"] for r in log) / n,
        ManifestKeys.REWARD_ACCURACY: sum(r["reward_accuracy"] * r["samples"] for r in log) / n,
        ManifestKeys.MARGIN: sum(r["margin_mean"] * r["samples"] for r in log) / n,
        ManifestKeys.REFINED_FRACTION: sum(r["refined_fraction"] * r["samples"] for r in log) / n,
        ManifestKeys.STEPS: float(log[-1]["step"]),
    }
    thresholds = [r["threshold"] for r in log if r.get("threshold") is not None]
    if thresholds:
        out[ManifestKeys.THRESHOLD] = float(thresholds[-1])
    return out


def _resume(args: TrainArgs, strategy: str, world: int, ckpt_root: str, scratch: str, state):
    """(step, local dir, SPA state, fetched, seconds to fetch) of the newest complete checkpoint, fetched onto this
    node (`fetched`: the local dir is a copy on the scratch volume, to delete once loaded); None if none.

    Every node fetches the whole checkpoint (a rank may need any shard when the process count changed), C bytes."""
    from accelerate.utils import broadcast_object_list

    found = checkpoints.latest_checkpoint(ckpt_root) if state.is_main_process else None
    found = broadcast_object_list([found], from_process=0)[0] if world > 1 else found
    if found is None:
        return None
    uri, step = found
    saved = json.loads(storage.read_text(storage.join(uri, checkpoints.SPA_STATE_FILE)))
    was = saved.get("strategy", strategy)
    sharded = "fsdp" in (was, strategy) or "deepspeed" in (was, strategy)
    if was != strategy and sharded:
        raise StageInputError(
            f"{uri}: written with --strategy {was}; resume it with the same strategy (or delete it to start over)"
        )
    if was == "deepspeed" and saved.get("world") != world:
        raise StageInputError(f"{uri}: a DeepSpeed checkpoint of {saved.get('world')} processes; resume with as many")
    local = os.path.join(scratch, "resume", f"{checkpoints.CHECKPOINT_PREFIX}{step}")
    fetched = storage.is_s3(uri) or world > 1
    t0 = time.time()
    if fetched:
        checkpoints.download_share(uri, local, state.local_process_index, _local_world(state))
        collectives.wait_long()  # every process's share is here (downloads take minutes)
    else:
        local = storage._local(uri)
    if state.is_main_process:
        print(f"{args.stage}: resuming from {uri} (step {step}), fetched in {time.time() - t0:.1f}s", file=sys.stderr)
    return step, local, saved, fetched, time.time() - t0


def _local_world(state) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if state.num_processes > 1 else 1


def _train(args: TrainArgs, work: runner.StageWork) -> None:
    # Read the pairs before the heavy imports: bad input fails in a fraction of a second.
    pairs = load_training_pairs(args.pairs)
    _quiet()
    import torch
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    # Usually already created by the runner; CPU-only machines need `cpu=True` to get a gloo process group.
    state = PartialState(cpu=not cuda)
    world = state.num_processes
    strategy = launch.active_strategy() if launch.under_launcher() else "none"
    seed_stage = args.stage == contract.SEED_TRAIN
    refinement = None
    if args.refinement and not seed_stage:
        refinement = Refinement(
            low_confidence_fraction=args.low_confidence_fraction,
            smoothing=args.smoothing,
            warmup_fraction=args.warmup_fraction,
            window=args.window,
            extrapolation=args.extrapolation,
        )
    tokenizer = modeling.load_tokenizer(args.model)
    rows, skipped = training_rows(pairs, tokenizer, args.max_prompt_length)
    if not rows:
        raise StageInputError(
            f"{args.pairs}: every prompt is longer than --max-prompt-length {args.max_prompt_length}"
        )
    per_device, accum = launch.batch_geometry(args.batch_size, args.per_device_batch_size, world)

    # This node's scratch dir: the Trainer's local checkpoints (each rank writes its own files) and fetched ones.
    scratch = checkpoints.scratch_dir(work.output)
    if state.is_local_main_process:
        checkpoints.reset_local(scratch)
    state.wait_for_everyone()
    ckpt_root = storage.join(work.output, contract.CHECKPOINT_SUBDIR)
    change = checkpoints.made_otherwise(ckpt_root, work.fingerprint, work.fingerprint_of) if work.is_main else None
    if change:  # never resumed: set aside (deleted once this stage succeeds), and the stage starts over
        work.set_aside(ckpt_root, f"checkpoints made with other settings ({change})")
    resume = _resume(args, strategy, world, ckpt_root, scratch, state)

    trainer = make_trainer(args, rows, os.path.join(scratch, "trainer"), refinement=refinement, processes=world)
    skipped += len(rows) - len(trainer.train_dataset)  # TRL drops pairs whose prompt fills max_length
    log_path = os.path.join(work.dir, LOG_FILE)
    if resume is not None:
        saved = resume[2]
        trainer.step_log = saved["log"]
        if trainer.window is not None and saved.get("window"):
            trainer.window.load_state_dict(saved["window"])
    if work.is_main:
        with open(log_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in trainer.step_log)

    t_start, samples_before = time.time(), sum(r["samples"] for r in trainer.step_log)
    fetched = [resume[1]] if resume is not None and resume[3] else []

    checkpoint_s: list[float] = []  # each checkpoint: local write + upload + marker, as the training waited for it

    def on_record(rec: dict[str, Any]) -> None:
        rec["time_s"] = round(time.time() - t_start, 3)  # for steady-state step times (benchmarks/gpu_train.py)
        # After a step every rank has loaded the fetched checkpoint (model, optimiser, RNG): free the scratch
        # volume before the next checkpoint is written there (so it needs C, not C + C/nodes).
        if fetched and state.is_local_main_process:
            shutil.rmtree(fetched.pop(), ignore_errors=True)
        if not work.is_main:
            return
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        total = trainer.state.max_steps
        print_every = max(1, total // 20)  # about 20 lines per run
        done_samples = sum(r["samples"] for r in trainer.step_log) - samples_before
        rate = done_samples / max(time.time() - t_start, 1e-9)
        work.progress(rec["step"], total, unit="steps", loss=rec["loss"], samples_per_s=rate)
        if rec["step"] % print_every == 0 or rec["step"] == total:
            thr = "" if rec["threshold"] is None else f" threshold {rec['threshold']:.4g}"
            print(
                f"{args.stage}: step {rec['step']}/{total} loss {rec['loss']:.4f} "
                f"acc {rec['reward_accuracy']:.3f} refined {rec['refined_fraction']:.3f}{thr}",
                file=sys.stderr,
            )

    def checkpoint_sink(local_dir: str) -> None:
        step = trainer.state.global_step
        collectives.wait_long()  # every rank's files are written
        dest = storage.join(ckpt_root, f"{checkpoints.CHECKPOINT_PREFIX}{step}")
        t0 = time.time()
        uploaded = checkpoints.upload_share(local_dir, dest, state.local_process_index, _local_world(state))
        collectives.wait_long()  # every rank's share is uploaded (minutes: outside the training collectives)
        if work.is_main:
            spa_state = {
                "step": step,
                "strategy": strategy,
                "world": world,
                "log": trainer.step_log,
                "window": trainer.window.state_dict() if trainer.window is not None else None,
            }
            checkpoints.finish_checkpoint(ckpt_root, step, spa_state, work.fingerprint, work.fingerprint_of)
            checkpoint_s.append(time.time() - trainer.checkpoint_started)
            print(f"{args.stage}: checkpoint {step} stored in {time.time() - t0:.1f}s (written and stored in "
                  f"{checkpoint_s[-1]:.1f}s)", file=sys.stderr)
        if state.is_local_main_process:  # stored: the scratch volume need not hold it any longer
            shutil.rmtree(local_dir, ignore_errors=True)
        if world > 1:
            print(f"{args.stage}: rank {state.process_index}: uploaded {uploaded} checkpoint files", file=sys.stderr)
        collectives.wait_long()  # rank 0 may have deleted an old 87 GB checkpoint meanwhile
        _stop_hook(args.stage, step, state.process_index)

    trainer.checkpoint_sink = checkpoint_sink
    trainer.on_step_record = on_record
    trainer.on_prepared = lambda: engine.check_engine(trainer, strategy, state.process_index, args.stage)
    trainer.train(resume_from_checkpoint=resume[1] if resume else None)
    train_s = time.time() - t_start

    _report_memory(args.stage, state.process_index)
    trainer.accelerator.wait_for_everyone()
    model_dtype = _output_dtype(modeling.resolve_model(args.model))
    t_save = time.time()
    _save_model(trainer, tokenizer, os.path.join(work.dir, contract.MODEL_SUBDIR), model_dtype, work.is_main)
    save_s = time.time() - t_save
    if state.is_local_main_process:
        shutil.rmtree(scratch, ignore_errors=True)  # not an output
    if work.is_main:
        trained = sum(r["samples"] for r in trainer.step_log) - samples_before
        work.metrics.update(_summarise(trainer.step_log))
        work.metrics[ManifestKeys.SAMPLES_PER_S] = trained / train_s if train_s > 0 else 0.0
        work.counts.update(
            {
                ManifestKeys.PAIRS: len(trainer.train_dataset),
                ManifestKeys.SKIPPED_LONG_PROMPTS: skipped,
                ManifestKeys.EFFECTIVE_BATCH: per_device * accum * world,
                ManifestKeys.PROCESSES: world,
                ManifestKeys.RESUMED_FROM_STEP: resume[0] if resume else 0,
            }
        )
        work.timings["train_s"] = work.timings[contract.WORK_SECONDS] = train_s
        spend_training(work, trainer.train_dataset, sum(r["samples"] for r in trainer.step_log),
                       args.max_length)
        work.timings["save_model_s"] = save_s
        if checkpoint_s:
            work.timings["checkpoint_save_s"] = sum(checkpoint_s) / len(checkpoint_s)
        if resume is not None:
            work.timings["resume_fetch_s"] = resume[4]
        work.after_manifest.append(lambda: checkpoints.delete_checkpoint(ckpt_root))


def _report_memory(stage: str, rank: int) -> None:
    """This rank's peak memory, for sizing (README) and the GPU check: accelerator memory, host resident set."""
    import resource

    import torch

    host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = ""
    if torch.cuda.is_available():
        gpu = (f"GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
               f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved; ")
    print(f"{stage}: rank {rank}: peak memory: {gpu}host {host_gib:.2f} GiB resident", file=sys.stderr)


def pair_tokens(row: dict[str, Any], max_length: int) -> int:
    """Tokens of one pair's two sequences as TRL's collator builds them: prompt + answer, cut at max_length."""
    prompt = len(row["prompt_ids"])
    return sum(min(prompt + len(row[side]), max_length) for side in ("chosen_ids", "rejected_ids"))


def spend_training(work: runner.StageWork, dataset, pairs_trained: int, max_length: int) -> None:
    """Pairs and tokens trained, each epoch counted. Tokens are counted exactly when training went over the data a
    whole number of times; otherwise (a fraction of an epoch, or batches evened out over ranks) they are the pairs
    trained times the mean tokens of a pair: an estimate, marked as one."""
    per_pair = [pair_tokens(row, max_length) for row in dataset.select_columns(
        ["prompt_ids", "chosen_ids", "rejected_ids"])]
    work.spend(Ledger.PAIRS_TRAINED, pairs_trained)
    if per_pair and pairs_trained % len(per_pair) == 0:
        work.spend(Ledger.TOKENS_TRAINED, pairs_trained // len(per_pair) * sum(per_pair))
    elif per_pair:
        work.spend(Ledger.TOKENS_TRAINED, round(pairs_trained * sum(per_pair) / len(per_pair)), estimated=True)


def _stop_hook(stage: str, step: int, rank: int) -> None:
    """The STOP_AFTER_ENV test hook: end abruptly after the first checkpoint at or after step N.

    With STOP_RANK_ENV set, only that rank dies, by SIGKILL (a lost pod or OOM-killed process); the others carry on
    into the next collective, which the launcher must turn into a failed stage instead of a hang.
    """
    stop = os.environ.get(STOP_AFTER_ENV)
    if not stop or step < int(stop):
        return
    only = os.environ.get(STOP_RANK_ENV)
    if only is None:
        print(f"{stage}: {STOP_AFTER_ENV}={stop}: exiting after checkpoint {step}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(STOP_EXIT_CODE)
    if int(only) == rank:
        print(f"{stage}: {STOP_RANK_ENV}={only}: killing rank {rank} after checkpoint {step}", file=sys.stderr)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _full_state_dict(trainer, is_main: bool) -> dict[str, Any]:
    """The policy's whole weights on the main process (empty elsewhere); every rank must call it.

    Under FSDP2 each parameter is all-gathered in turn (`full_tensor`, a fresh tensor): accelerate's
    `get_state_dict` returns views of FSDP's unsharded buffers, which on CPU are freed again before they are read.
    """
    from torch.distributed.tensor import DTensor

    if not trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)  # DDP, one process; ZeRO-3 gathers
    full = {}
    for name, value in trainer.model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if is_main:
            full[name] = value.detach().cpu()
    return full


def _save_model(trainer, tokenizer, out_dir: str, dtype: str, is_main: bool) -> None:
    """The trained policy as a plain HF model (LoRA merged) in the input model's dtype, plus the tokenizer.

    Every rank takes part (the weights are gathered); the main process writes.
    """
    import torch
    from accelerate.utils import is_peft_model

    full = _full_state_dict(trainer, is_main)
    if not is_main:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    target = getattr(torch, dtype)
    if is_peft_model(model):  # LoRA trains under DDP only: the unwrapped model holds whole weights
        model.merge_and_unload().to(target).save_pretrained(out_dir, safe_serialization=True)
    else:
        state_dict = {k: v.to(target).contiguous() for k, v in full.items()}
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


__all__ = [
    "Refinement",
    "load_training_pairs",
    "make_trainer",
    "policy_dtype",
    "run",
    "training_rows",
]
