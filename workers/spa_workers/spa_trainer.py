"""SPA's DPOTrainer subclass: the self-refinement loss on TRL's DPO (DESIGN §3, `spa_loss`), shard-safe.

Built lazily (`trainer_class`): importing TRL costs seconds, and a finished stage needs none. `make_trainer` builds a
ready one from the stage's arguments (DPOConfig, LoRA, reference model, the per-step callback). The stage around it
(inputs, launch, resuming, saving) is train.py.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from spa_workers import checkpoints, collectives, engine, launch, modeling
from spa_workers.contract import StageInputError, TrainArgs

# Linear LR warm-up over this fraction of the steps, then cosine decay: the alignment-handbook recipe that the
# official SPA code trains with.
LR_WARMUP_RATIO = 0.1
EXTRAPOLATION_CHUNK_TOKENS = 256  # labelled tokens per float32 log-softmax in the λ path; bounds that copy


_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass(frozen=True)
class Refinement:
    """SPA self-refinement settings (None on the trainer means plain DPO)."""

    low_confidence_fraction: float = 0.1
    smoothing: float = 0.1
    warmup_fraction: float = 0.2
    window: int = 50
    extrapolation: float = 0.0


def _identity(x):
    """The "head" for logits that are already logits (completion_logps projects hidden states otherwise)."""
    return x


@functools.cache
def trainer_class():
    """The DPOTrainer subclass, built lazily: importing TRL costs seconds, and a finished stage needs none."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    from spa_workers.spa_loss import (
        MarginWindow,
        completion_logps,
        dpo_margin,
        self_refinement_losses,
        warmup_alpha,
    )

    class SPATrainer(DPOTrainer):
        """A DPOTrainer whose training loss is SPA's self-refinement loss (plain sigmoid DPO without it).

        Policy log-probs come from TRL's fused-head forward, reference log-probs from `compute_ref_log_probs`
        (the same reference handling as TRL: a separate model, or the adapter disabled under PEFT). With λ > 0
        one no-grad pass of policy and reference backbones yields both the reference log-probs and the
        extrapolated ones.

        An optimiser step is one global batch, whatever its layout (processes × accumulation): its threshold is
        the window's before the step, its scores enter the window once, after the step, and the duplicated
        samples accelerate's `even_batches` pads the epoch's last global batch with are left out of the loss,
        the window and the log (`engine.StepPlan`).
        """

        def __init__(self, *args: Any, refinement: Refinement | None = None, **kwargs: Any) -> None:
            self._reference_to_shard = kwargs.get("ref_model")  # sharded once the accelerator exists
            super().__init__(*args, **kwargs)
            self.refinement = refinement
            self.window = (
                MarginWindow(refinement.window, refinement.low_confidence_fraction) if refinement else None
            )
            self.step_log: list[dict[str, Any]] = []  # one record per optimiser step, identical on all ranks
            self._micro: list[dict[str, Any]] = []  # this step's micro-batches
            self._plan: engine.StepPlan | None = None  # this step's real samples (get_batch_samples)
            self._step_threshold: float | None = None
            self._step_window_size = 0

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if launch.active_strategy() == "fsdp" and launch.under_launcher():
                engine.force_fsdp(self.accelerator)
                self.is_fsdp_enabled = True
            if self.is_fsdp_enabled and self._reference_to_shard is not None:
                engine.shard_reference(self.accelerator, self._reference_to_shard)
            self._reference_to_shard = None

        # Warm-up length depends on the step count, which the Trainer knows only here. Floor (not ceil, as
        # `warmup_steps` ratios do) so that a one-step run still moves the weights.
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            self.args.warmup_steps = int(LR_WARMUP_RATIO * num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """The Trainer fetches an optimiser step's micro-batches at once: count the step's real samples."""
            batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            gradient_state = self.accelerator.gradient_state
            self._plan = engine.StepPlan.of(
                [len(b["input_ids"]) // 2 for b in batch_samples],  # chosen rows then rejected rows
                self.accelerator.num_processes,
                gradient_state.remainder if gradient_state.end_of_dataloader else -1,
            )
            return batch_samples, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training:  # evaluation: TRL's own DPO loss
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            micro = len(self._micro)
            if micro == 0:  # an optimiser step begins: its threshold is the window's before it
                self._step_threshold = self.window.threshold() if self.window is not None else None
                self._step_window_size = len(self.window) if self.window is not None else 0
            completion_mask = inputs["completion_mask"]
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            model_kwargs["use_cache"] = False
            if self.aux_loss_enabled:
                model_kwargs["output_router_logits"] = True
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            chosen, rejected = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

            lam = self.refinement.extrapolation if self.refinement else 0.0
            extrapolated = None
            if lam > 0:
                ref_lp, ext_lp = self.extrapolated_logps(model, model_kwargs, labels, lam)
                ref_chosen, ref_rejected = ref_lp.chunk(2, dim=0)
                ext_chosen, ext_rejected = ext_lp.chunk(2, dim=0)
                extrapolated = dpo_margin(ext_chosen, ext_rejected, ref_chosen, ref_rejected)
            elif "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref = self.ref_model if self.ref_model is not None else self.model
                ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)
            margin = dpo_margin(chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype))

            stats = None
            if self.refinement:
                r = self.refinement
                alpha = warmup_alpha(
                    self.state.global_step, self.state.max_steps, r.warmup_fraction, r.smoothing
                )
                losses, stats = self_refinement_losses(
                    margin,
                    extrapolated,
                    beta=self.beta,
                    alpha=alpha,
                    threshold=self._step_threshold,
                    gather=self.accelerator.gather,
                )
            else:
                losses = -F.logsigmoid(self.beta * margin)
            plan = self._plan or engine.StepPlan.of([margin.numel()], 1, -1)  # called outside `train`: one plain batch
            real, scale = plan.weights(micro, self.accelerator.process_index, margin.numel())
            # The mean over the step's real samples, once the Trainer has divided by the step's micro-batches
            # and the data-parallel gradient reduction by the processes.
            loss = (losses * real.to(losses.device)).sum() * scale
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._record(losses, margin, stats, plan.real[micro] if micro < len(plan.real) else margin.numel())
            return loss

        def extrapolated_logps(self, model, model_kwargs, labels, lam: float):
            """(reference, extrapolated) summed completion log-probs, per row, without gradient.

            Both forwards go through the prepared (DDP / FSDP / DeepSpeed-wrapped) models: under sharding a
            submodule or the LM head alone holds only this rank's shard, so only the wrapped forward sees whole
            weights. That costs the (B, T, V) logits of each model, which the no-grad pass frees right away.
            """
            unwrapped = self.accelerator.unwrap_model(model)
            kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            ):
                policy_logits = model(**kwargs).logits[:, :-1]
                if self.ref_model is not None:
                    ref_logits = self.ref_model(**kwargs).logits[:, :-1]
                elif is_peft_model(unwrapped):  # the reference is the model with its adapter off (or TRL's "ref")
                    with use_adapter(
                        unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
                    ):
                        ref_logits = model(**kwargs).logits[:, :-1]
                else:
                    raise RuntimeError(
                        "λ-extrapolation needs a reference model (precomputed log-probs are not enough)"
                    )
                return completion_logps(
                    policy_logits, ref_logits, _identity, _identity, labels[:, 1:], lam,
                    chunk_tokens=EXTRAPOLATION_CHUNK_TOKENS,
                )

        def _record(self, losses, margin, stats, real: int) -> None:
            """This micro-batch's gathered figures, without the duplicates (they come last in the gather)."""
            gather = self.accelerator.gather
            rec: dict[str, Any] = {"losses": gather(losses.detach().float()).cpu()[:real]}
            if stats is None:
                rec["margins"] = gather((self.beta * margin).detach().float()).cpu()[:real]
            else:
                rec.update(
                    margins=stats.margins[:real],
                    scores=stats.scores[:real],
                    low=stats.low_confidence[:real],
                    alpha=stats.alpha,
                )
            self._micro.append(rec)
            mode = "train"
            if rec["margins"].numel():
                self._metrics[mode]["rewards/accuracies"].append(float((rec["margins"] > 0).float().mean()))
                self._metrics[mode]["rewards/margins"].append(float(rec["margins"].mean()))
            if stats is not None and stats.threshold is not None:
                self._metrics[mode]["spa/threshold"].append(stats.threshold)
                self._metrics[mode]["spa/refined_fraction"].append(stats.refined_fraction)

        def finish_step(self, lr: float | None) -> dict[str, Any]:
            """Fold this optimiser step's micro-batches into one log record; push its scores into the window."""
            micro, self._micro, self._plan = self._micro, [], None
            margins = torch.cat([m["margins"] for m in micro])
            losses = torch.cat([m["losses"] for m in micro])
            rec: dict[str, Any] = {
                "step": self.state.global_step,
                "epoch": self.state.epoch,
                "lr": lr,
                "samples": int(margins.numel()),
                "loss": float(losses.mean()),
                "reward_accuracy": float((margins > 0).float().mean()),
                "margin_mean": float(margins.mean()),
                "alpha": 0.0,
                "refined_fraction": 0.0,
                "threshold": None,
            }
            if self.refinement:
                low = torch.cat([m["low"] for m in micro]).float()
                scores = torch.cat([m["scores"] for m in micro])
                alpha = micro[-1]["alpha"]
                # Proof that every rank judged this step against the same threshold (NaN: none yet).
                thr = self._step_threshold
                mine = torch.tensor([math.nan if thr is None else thr], dtype=torch.float64,
                                    device=self.accelerator.device)
                rank_thresholds = self.accelerator.gather(mine).cpu().tolist()
                rec.update(
                    alpha=alpha,
                    threshold=thr,
                    window_size=self._step_window_size,
                    refined_fraction=float(low.mean()) if alpha > 0 else 0.0,
                    low_confidence_fraction=float(low.mean()),
                    rank_thresholds=None if thr is None else rank_thresholds,
                    scores=scores.tolist(),
                )
                self.window.push(scores)  # once per optimiser step: the global batch, no duplicates
            rec["margins"] = margins.tolist()
            # A diverged step ends the stage now (exit 2, naming the step), not after hours of training on NaN
            # weights; every rank sees the same gathered figures, so all stop together.
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["margin_mean"])):
                raise StageInputError(
                    f"the DPO loss is {rec['loss']} (mean margin "
                    f"{rec['margin_mean']}) at optimizer step {rec['step']}: training diverged; lower the learning "
                    "rate or check the model and pairs"
                )
            self.step_log.append(rec)
            return rec

        # Hooks the stage sets: `on_prepared()` once the models are wrapped (sharded), `on_step_record(record)`
        # after each optimiser step, `checkpoint_sink(dir)` after the Trainer wrote a checkpoint locally. The
        # end-of-training checkpoint is skipped: the stage saves the final model itself right after.
        on_prepared = None
        on_step_record = None
        checkpoint_sink = None

        checkpoint_started = 0.0  # time.time() when the current checkpoint began (the stage times it)

        def _save_checkpoint(self, model, trial):
            if self.state.global_step >= self.state.max_steps:
                return
            self.checkpoint_started = time.time()
            super()._save_checkpoint(model, trial)
            if self.checkpoint_sink is not None:
                run_dir = self._get_output_dir(trial=trial)
                self.checkpoint_sink(
                    os.path.join(run_dir, f"{checkpoints.CHECKPOINT_PREFIX}{self.state.global_step}")
                )

    return SPATrainer


# --- the trainer ---


def _step_callback(trainer, cadence: checkpoints.Cadence):
    """Closes each optimiser step's log record (with the learning rate that step used) and asks for a
    checkpoint when the cadence says so (rank 0's clock decides, so that every rank saves together)."""
    from accelerate.utils import broadcast_object_list
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        lr: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if trainer.on_prepared is not None:
                trainer.on_prepared()

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

        def on_step_end(self, args, state, control, **kwargs):
            rec = trainer.finish_step(self.lr)
            if trainer.on_step_record is not None:
                trainer.on_step_record(rec)
            if cadence.enabled and state.global_step < state.max_steps:
                due = cadence.due(state.global_step)
                if trainer.accelerator.num_processes > 1:
                    due = broadcast_object_list([due], from_process=0)[0]
                if due:
                    control.should_save = True
                    cadence.taken()

    return StepLog()


def policy_dtype(lora: bool, strategy: str) -> str:
    """The dtype to load the policy in: as stored (bf16 on GPU, see modeling.load_model) where its stored weights
    are not what Adam updates — a frozen LoRA base, FSDP (accelerate upcasts the shards to fp32 master weights under
    bf16 mixed precision), ZeRO-3 (fp32 optimiser partitions) — else float32: DPO's 5e-7 learning rate moves a
    weight by far less than bf16's resolution, so pure-bf16 updates would vanish."""
    return "auto" if lora or strategy in ("fsdp", "deepspeed") else "float32"


def training_config(args: TrainArgs, output_dir: str, processes: int = 1, max_steps: int = -1):
    """The DPOConfig (TrainingArguments) of a stage. Built before any model is loaded: under `accelerate launch
    --use_deepspeed` its construction is what makes the DeepSpeed config live (accelerate's DeepSpeedPlugin sets
    transformers' HfDeepSpeedConfig), and `from_pretrained` then creates every parameter ZeRO-3-partitioned
    (`zero3_init_flag`) instead of whole on every rank."""
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    per_device, accum = launch.batch_geometry(args.batch_size, args.per_device_batch_size, processes)
    return DPOConfig(
        output_dir=output_dir,
        seed=args.seed,
        data_seed=args.seed,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        num_train_epochs=args.epochs,
        max_steps=max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=cuda,  # CPU runs are tiny: no need to trade speed
        save_strategy="no",  # the cadence callback asks for checkpoints
        save_total_limit=1,
        logging_steps=1,
        report_to=[],
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient: no extra graph walk
        ddp_timeout=int(collectives.collective_timeout_s()),  # the group already has it (collectives.py)
    )


def load_models(args: TrainArgs, strategy: str):
    """(policy, reference or None): the reference is frozen, as stored (bf16 on GPU) whatever the policy's dtype;
    LoRA has none (the adapter turned off). Under DeepSpeed the training config must already exist (see
    `training_config`): a model loaded whole on every rank is refused here rather than found out as an OOM."""
    model = modeling.load_model(args.model, dtype=policy_dtype(args.lora_r > 0, strategy))
    ref_model = None
    if args.lora_r == 0:
        ref_model = modeling.load_model(args.reference or args.model, dtype="auto")
    if strategy == "fsdp":  # CPU-RAM-efficient loading: only local rank 0 read the weights
        import torch

        with torch.no_grad():
            loaded = bool(next(model.parameters()).abs().sum() > 0)
        if not loaded:
            for m in (model, ref_model):
                if m is not None:
                    engine.release_zeros(m)
        print(f"{args.stage}: rank {os.environ.get('RANK', '0')}: loaded "
              f"{'the weights' if loaded else 'no weights (they come from rank 0 when sharded)'}", file=sys.stderr)
    if strategy == "deepspeed":
        from transformers.integrations import is_deepspeed_zero3_enabled

        whole = [n for m in (model, ref_model) if m is not None for n, p in m.named_parameters()
                 if not hasattr(p, "ds_id")]
        if not is_deepspeed_zero3_enabled() or whole:
            raise RuntimeError(f"--strategy deepspeed: ZeRO-3 init was not active when the models were loaded "
                               f"({len(whole)} parameters loaded whole on this rank)")
        print(f"{args.stage}: ZeRO-3 init: policy and reference loaded partitioned", file=sys.stderr)
    return model, ref_model


def make_trainer(
    args: TrainArgs,
    rows: list[dict[str, Any]],
    output_dir: str,
    *,
    refinement: Refinement | None,
    processes: int = 1,
    max_steps: int = -1,
):
    """A ready SPATrainer for `args` on `rows` (TRL conversational pairs); checkpoints go to `output_dir`
    locally, on the cadence of `args.checkpoint_every_steps` / `args.checkpoint_every_minutes`."""
    from datasets import Dataset

    config = training_config(args, output_dir, processes, max_steps)  # first: see training_config
    tokenizer = modeling.load_tokenizer(args.model)
    model, ref_model = load_models(args, launch.active_strategy() if launch.under_launcher() else "none")
    peft_config = None
    if args.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = trainer_class()(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        refinement=refinement,
    )
    cadence = checkpoints.Cadence(args.checkpoint_every_steps, args.checkpoint_every_minutes)
    trainer.add_callback(_step_callback(trainer, cadence))
    if not sys.stderr.isatty():  # the step log line replaces the Trainer's per-step dict printing
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer
