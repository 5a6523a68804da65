"""Loading pairs and prompts: JSONL and Parquet, flat and UltraFeedback-binarized shapes, clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spa_workers.contract import StageInputError
from spa_workers.data import PreferencePair, load_pairs, load_prompts, write_jsonl

FLAT = {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."}
UF = {
    "prompt": "What is 2 plus 2?",
    "chosen": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}],
    "rejected": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "5."}],
    "score_chosen": 9.0, "score_rejected": 2.0,
}
EXPECTED = PreferencePair(prompt=[{"role": "user", "content": "What is 2 plus 2?"}], chosen="4.", rejected="5.")


@pytest.mark.parametrize("row", [FLAT, UF], ids=["flat", "ultrafeedback"])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_pairs_in_both_shapes_and_formats(tmp_path, row, fmt):
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(str(path), [row, row])
    else:
        pq.write_table(pa.Table.from_pylist([row, row]), path)
    assert load_pairs(str(path)) == [EXPECTED, EXPECTED]


def test_ultrafeedback_without_prompt_column_uses_the_conversation(tmp_path):
    row = {k: v for k, v in UF.items() if k != "prompt"}
    write_jsonl(str(tmp_path / "p.jsonl"), [row])
    assert load_pairs(str(tmp_path / "p.jsonl")) == [EXPECTED]


def test_prompts_from_prompt_or_messages(tmp_path):
    write_jsonl(str(tmp_path / "p.jsonl"), [{"prompt": "a"}, {"messages": UF["chosen"]}])
    assert load_prompts(str(tmp_path / "p.jsonl")) == [[{"role": "user", "content": "a"}], EXPECTED.prompt]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"prompt": "p", "chosen": "a"}], "row 1: missing column(s) rejected"),
    ([FLAT, {"chosen": "a", "rejected": "b"}], "row 2: missing column prompt"),
    ([{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}],
     "row 1: column chosen: the message list must end with an assistant message"),
    ([{"prompt": 3, "chosen": "a", "rejected": "b"}], "row 1: column prompt: expected a string"),
    ([], "no rows"),
])
def test_bad_pairs_name_file_and_row(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(str(path), rows)
    with pytest.raises(StageInputError) as exc:
        load_pairs(str(path))
    assert str(exc.value).startswith(str(path)) and message in str(exc.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StageInputError, match="unsupported file type"):
        load_pairs(str(tmp_path / "x.csv"))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(StageInputError, match=r"x\.parquet: not a readable Parquet file"):
        load_pairs(str(tmp_path / "x.parquet"))
    (tmp_path / "x.jsonl").write_text("[1, 2]\n")
    with pytest.raises(StageInputError, match="row 1: expected a JSON object"):
        load_prompts(str(tmp_path / "x.jsonl"))
