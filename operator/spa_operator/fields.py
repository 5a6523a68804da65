"""Which manifest field each stage argument comes from, and the run's own inputs by field: so that what `spa`
says names what the user wrote (`spec.training.learningRate`), not the worker's argument (`learning_rate`).

Pure: no I/O. `stage_graph` (planner.py) is where the arguments are made; tests/test_fields.py checks this table
against it (every fingerprinted argument of every stage has a field, and changing the field changes the argument).
"""

from __future__ import annotations

from spa_workers import contract

from spa_operator.spec import AlignmentRun

_TRAINING = "spec.training"
_REFINEMENT = "spec.training.refinement"
_GENERATION = "spec.generation"
_WIN_RATE = "spec.evaluation.winRate"

# Arguments that mean the same field in every stage that has them.
_COMMON = {
    "beta": f"{_TRAINING}.beta",
    "learning_rate": f"{_TRAINING}.learningRate",
    "batch_size": f"{_TRAINING}.batchSize",
    "per_device_batch_size": f"{_TRAINING}.microBatchSize",
    "max_length": f"{_TRAINING}.maxLength",
    "max_prompt_length": f"{_TRAINING}.maxPromptLength",
    "lora_r": f"{_TRAINING}.lora.r",
    "lora_alpha": f"{_TRAINING}.lora.alpha",
    "lora_dropout": f"{_TRAINING}.lora.dropout",
    "refinement": f"{_REFINEMENT}.enabled",
    "low_confidence_fraction": f"{_REFINEMENT}.lowConfidenceFraction",
    "smoothing": f"{_REFINEMENT}.smoothing",
    "warmup_fraction": f"{_REFINEMENT}.warmupFraction",
    "window": f"{_REFINEMENT}.window",
    "extrapolation": f"{_REFINEMENT}.extrapolation",
    "heldout": "spec.data.heldout",
    "prompts": "spec.data.prompts",
    "prompts_needed": "spec.iterations.promptsPerIteration",
    "slice_start": "spec.iterations.promptsPerIteration",
    "slice_end": "spec.iterations.promptsPerIteration",
    "responses_per_prompt": f"{_GENERATION}.responsesPerPrompt",
    "temperature": f"{_GENERATION}.temperature",
    "top_p": f"{_GENERATION}.topP",
    "max_new_tokens": f"{_GENERATION}.maxNewTokens",
    "pairing": "spec.judge.pairing",
    "winrate_prompts": f"{_WIN_RATE}.prompts",
    "winrate_samples": f"{_WIN_RATE}.samples",
    "winrate_reference_answers": f"{_WIN_RATE}.referenceAnswers",
    "winrate_reference_model": f"{_WIN_RATE}.referenceModel",
    "answer_backend": f"{_WIN_RATE}.backend",
    "answer_max_new_tokens": f"{_WIN_RATE}.maxNewTokens",
    "answer_temperature": f"{_WIN_RATE}.temperature",
    "judge_endpoint": f"{_WIN_RATE}.judge.endpoint",
    "judge_model": f"{_WIN_RATE}.judge.model",
    "judge_extra_body": f"{_WIN_RATE}.judge.extraBody",
    "judge_max_failed_fraction": f"{_WIN_RATE}.judge.maxFailedFraction",
    "lc_glm": f"{_WIN_RATE}.lengthControl",
    "length_baseline": "spec.gate.maxLengthChange",  # the SFT model, sampled for the length gate
}
# Arguments whose field depends on the stage (an input another stage made is named by that stage instead).
_BY_STAGE = {
    contract.VALIDATE: {"model": "spec.model.sft", "seed_pairs": "spec.data.seed"},
    contract.SEED_TRAIN: {"model": "spec.model.sft", "reference": "spec.model.sft", "pairs": "spec.data.seed",
                          "epochs": f"{_TRAINING}.seedEpochs", "seed": f"{_TRAINING}.seed",
                          # plain DPO on gold pairs: refinement is off whatever the spec says
                          **dict.fromkeys(("refinement", "low_confidence_fraction", "smoothing", "warmup_fraction",
                                           "window", "extrapolation"))},
    contract.TRAIN: {"epochs": f"{_TRAINING}.epochsPerIteration", "seed": f"{_TRAINING}.seed"},
    contract.GENERATE: {"seed": f"{_GENERATION}.seed", "backend": f"{_GENERATION}.backend",
                        "batch_size": f"{_GENERATION}.batchSize", "shard_count": f"{_GENERATION}.shards"},
    contract.JUDGE: {"reference": "spec.model.sft", "seed": f"{_GENERATION}.seed", "backend": "spec.judge.backend",
                     "shard_count": "spec.judge.shards"},
    contract.EVALUATE: {"reference": "spec.model.sft", "seed": f"{_GENERATION}.seed"},
}


def spec_field(stage: str, arg: str) -> str | None:
    """The manifest field a stage's argument comes from; None for one the planner sets itself (a constant, or an
    input that another stage made)."""
    own = _BY_STAGE.get(stage, {})
    return own[arg] if arg in own else _COMMON.get(arg)


def user_inputs(run: AlignmentRun) -> dict[str, tuple[str, bool]]:
    """The run's own inputs that it uses, files first: field -> (URI, is a model folder)."""
    spec = run.spec
    win = spec.evaluation.win_rate if spec.evaluation else None
    files = {"spec.data.seed": spec.data.seed, "spec.data.prompts": spec.data.prompts,
             "spec.data.heldout": spec.data.heldout}
    models = {"spec.model.sft": spec.model.sft}
    if win:
        files |= {f"{_WIN_RATE}.prompts": win.prompts, f"{_WIN_RATE}.referenceAnswers": win.reference_answers}
        if not win.reference_answers:  # the reference model is unused once reference answers are given
            models[f"{_WIN_RATE}.referenceModel"] = win.reference_model
    return ({name: (uri, False) for name, uri in files.items() if uri}
            | {name: (uri, True) for name, uri in models.items() if uri})
