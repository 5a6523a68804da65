"""Reading preference pairs and prompts from JSONL or Parquet, by URI.

Two shapes are accepted for pairs:
- flat: `{"prompt": str, "chosen": str, "rejected": str}`
- UltraFeedback-binarized: `chosen` / `rejected` are chat message lists ending with the assistant answer,
  `prompt` (optional) the user turn.
Prompts are a `prompt` string (or a `messages` list). Every error names the file and, where it applies, the row.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

from spa_workers import storage
from spa_workers.contract import StageInputError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages  # the conversation up to (not including) the answer
    chosen: str
    rejected: str


def _fmt(uri: str) -> str:
    name = uri.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise StageInputError(f"{uri}: unsupported file type (expected .jsonl or .parquet)")


def read_records(uri: str) -> list[dict[str, Any]]:
    """All rows of a JSONL or Parquet file as dicts. A directory URI reads its data files in order."""
    fmt = _fmt(uri)
    try:
        raw = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise StageInputError(f"{uri}: file not found") from None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(raw)).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise StageInputError(f"{uri}: not a readable Parquet file ({e})") from None
    rows = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageInputError(f"{uri}: row {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise StageInputError(f"{uri}: row {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _messages(value: Any, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise StageInputError(f"{where}: expected a string or a list of {{role, content}} messages")


def _answer(value: Any, where: str) -> tuple[Messages | None, str]:
    """An answer as (conversation before it or None, text)."""
    if isinstance(value, str):
        return None, value
    msgs = _messages(value, where)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise StageInputError(f"{where}: the message list must end with an assistant message")
    return msgs[:-1], msgs[-1]["content"]


def parse_pair(row: dict[str, Any], where: str) -> PreferencePair:
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        raise StageInputError(f"{where}: missing column(s) {', '.join(missing)} "
                              f"(expected prompt, chosen, rejected; found {', '.join(sorted(row)) or 'none'})")
    chosen_ctx, chosen = _answer(row["chosen"], f"{where}: column chosen")
    rejected_ctx, rejected = _answer(row["rejected"], f"{where}: column rejected")
    if "prompt" in row and row["prompt"] is not None and (chosen_ctx is None or isinstance(row["prompt"], list)):
        prompt = _messages(row["prompt"], f"{where}: column prompt")
    elif chosen_ctx:
        prompt = chosen_ctx
    else:
        raise StageInputError(f"{where}: missing column prompt")
    if rejected_ctx and chosen_ctx and rejected_ctx != chosen_ctx:
        raise StageInputError(f"{where}: chosen and rejected conversations have different prompts")
    # A pair with an empty side or two equal answers teaches nothing and skews DPO: it is a data error.
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise StageInputError(f"{where}: column {name} is empty")
    if not any(m["content"].strip() for m in prompt):
        raise StageInputError(f"{where}: column prompt is empty")
    if chosen == rejected:
        raise StageInputError(f"{where}: chosen and rejected are the same answer")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def load_pairs(uri: str) -> list[PreferencePair]:
    rows = read_records(uri)
    if not rows:
        raise StageInputError(f"{uri}: no rows")
    return [parse_pair(r, f"{uri}: row {n}") for n, r in enumerate(rows, start=1)]


def load_prompts(uri: str) -> list[Messages]:
    rows = read_records(uri)
    if not rows:
        raise StageInputError(f"{uri}: no rows")
    out = []
    for n, row in enumerate(rows, start=1):
        if "prompt" in row:
            msgs = _messages(row["prompt"], f"{uri}: row {n}: column prompt")
        elif "messages" in row:
            msgs = _messages(row["messages"], f"{uri}: row {n}: column messages")
            msgs = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        else:
            raise StageInputError(f"{uri}: row {n}: missing column prompt (found {', '.join(sorted(row)) or 'none'})")
        if not any(m["content"].strip() for m in msgs):
            raise StageInputError(f"{uri}: row {n}: the prompt is empty")
        out.append(msgs)
    return out


def load_reference_answers(uri: str, n: int) -> list[str]:
    """The win rate's reference answers for the first `n` prompts: row k answers prompt k (column answer or output).

    Evaluate reads them with this, and validate checks them with it, so both match answers to prompts alike."""
    rows = read_records(uri)
    if len(rows) < n:
        raise StageInputError(f"{uri}: {len(rows)} reference answers for {n} prompts (one row per prompt, in order)")
    out = []
    for k, row in enumerate(rows[:n], start=1):
        answer = row.get("answer", row.get("output"))
        if not isinstance(answer, str):
            raise StageInputError(f"{uri}: row {k}: missing string column answer (or output)")
        out.append(answer)
    return out
