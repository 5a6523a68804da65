"""The stage contract: one definition of every stage's arguments, outputs and manifests, in four parts:
`common` (stage names, exit codes, errors, the finite-numbers rule), `args` (each stage's arguments, to and from a
command line), `manifest` (what a finished stage leaves: files, manifest, heartbeat) and `keys` (the names of the
counts, metrics and ledger entries in a manifest). Everything is imported from here (`contract.StageManifest`).
This package must stay importable without torch: the operator imports it.
"""

from spa_workers.contract.args import (
    ARGS_BY_STAGE,
    EvaluateArgs,
    GenerateArgs,
    JudgeArgs,
    SeedTrainArgs,
    StageArgs,
    TrainArgs,
    ValidateArgs,
)
from spa_workers.contract.common import (
    CONTRACT_VERSION,
    EVALUATE,
    EXIT_BAD_INPUT,
    EXIT_STORAGE,
    GENERATE,
    JUDGE,
    JUDGE_API_KEY_ENV,
    SEED_TRAIN,
    STAGES,
    TRAIN,
    VALIDATE,
    StageInputError,
    StageRetryableError,
    dumps,
    non_finite,
    require_finite,
    shard_dir,
)
from spa_workers.contract.keys import (
    REQUESTED_CPUS_ENV,
    REQUESTED_GPUS_ENV,
    WORK_SECONDS,
    Ledger,
    ManifestKeys,
    check_ledger,
)
from spa_workers.contract.manifest import (
    CHECKPOINT_SUBDIR,
    ETAG_IDENTIFIES_ABOVE,
    MANIFEST,
    MODEL_SUBDIR,
    PAIRS_FILE,
    PROGRESS,
    RESPONSES_FILE,
    Heartbeat,
    StageManifest,
    file_digest,
    finished_shard_dirs,
    read_manifest,
    read_stage_manifests,
    stage_manifest_dirs,
    versions,
)

__all__ = [
    "ARGS_BY_STAGE", "CHECKPOINT_SUBDIR", "CONTRACT_VERSION", "ETAG_IDENTIFIES_ABOVE", "EVALUATE",
    "EXIT_BAD_INPUT", "EXIT_STORAGE", "GENERATE", "JUDGE", "JUDGE_API_KEY_ENV", "MANIFEST", "MODEL_SUBDIR",
    "PAIRS_FILE", "PROGRESS", "REQUESTED_CPUS_ENV", "REQUESTED_GPUS_ENV", "RESPONSES_FILE", "SEED_TRAIN",
    "STAGES", "TRAIN", "VALIDATE", "WORK_SECONDS", "EvaluateArgs", "GenerateArgs", "Heartbeat", "JudgeArgs",
    "Ledger", "ManifestKeys", "SeedTrainArgs", "StageArgs", "StageInputError", "StageManifest",
    "StageRetryableError", "TrainArgs", "ValidateArgs", "check_ledger", "dumps", "file_digest",
    "finished_shard_dirs", "non_finite", "read_manifest", "read_stage_manifests", "require_finite",
    "shard_dir", "stage_manifest_dirs", "versions",
]
