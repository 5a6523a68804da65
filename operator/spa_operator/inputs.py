"""The run's own inputs, checked by `spa` before it says anything about stage outputs.

A missing or unreadable input must be reported as what it is, naming the manifest field and the file, never as
"outputs made with other settings" (a missing file changes the fingerprint of every stage that reads it), and it
must be found before anything is set aside: a typo in a path must not cost finished work.
- `problems`: cheap, at every `spa plan` and `spa run`: local files and model folders exist and can be read; with
  `remote`, S3 objects exist too (hf:// models are left to validate).
- `check_parse`: the validate stage's own checks, run here (CPU, no model weights): before any output is set aside or
  called stale, every input parses and storage is writable.
"""

from __future__ import annotations

import os

from spa_workers import storage
from spa_workers.contract import StageInputError, ValidateArgs

from spa_operator.fields import user_inputs
from spa_operator.spec import AlignmentRun


def is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_problem(path: str, model: bool) -> str | None:
    target = os.path.join(path, "config.json") if model else path
    if model and not os.path.isfile(target):
        return "no model there (no config.json)"
    if not os.path.exists(target):
        return "file not found"
    if os.path.isdir(target):
        return "a folder, not a file"
    if not os.access(target, os.R_OK):
        return "not readable (permission denied)"
    return None


def problems(run: AlignmentRun, remote: bool = False) -> list[str]:
    """'<field>: <uri>: <what is wrong>' for each input that is not there or cannot be read."""
    found = []
    for field, (uri, model) in user_inputs(run).items():
        if is_local_path(uri):
            problem = _local_problem(storage._local(uri), model)
        elif remote and storage.is_s3(uri):
            there = storage.exists(storage.join(uri, "config.json") if model else uri)
            problem = None if there else ("no model there (no config.json)" if model else "file not found")
        else:
            problem = None
        if problem:
            found.append(f"{field}: {uri}: {problem}")
    return found


def name_field(message: str, run: AlignmentRun) -> str:
    """`message` (a validate error, which starts with or names the file) led by the field of the input it names."""
    for field, (uri, _) in sorted(user_inputs(run).items(), key=lambda item: -len(item[1][0])):
        if uri in message:
            return f"{field}: {message}"
    return message


def check_parse(run: AlignmentRun, validate_args: ValidateArgs, root: str) -> dict[str, int]:
    """The validate stage's checks, here; a failure is a StageInputError led by the field it is about."""
    from spa_workers.validate import check, check_storage_writable

    try:
        counts = check(validate_args)
    except StageInputError as e:
        raise StageInputError(name_field(str(e), run)) from None
    check_storage_writable(root)
    return counts
