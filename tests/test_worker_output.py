"""Two ranks of one stage write to the same stderr; their lines must not interleave mid-line, even where the
environment sets PYTHONUNBUFFERED (many CI and container images do: CPython then writes print()'s text and its newline
in two write calls, and another rank's line can land between them — CI saw the FSDP test's per-rank lines mixed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

RANK = """
import sys
from spa_workers import cli
cli.one_write_per_line()
for i in range(3000):
    print(f"train: rank {sys.argv[1]}: fsdp policy: 4/4 parameters, local sum of squares {i}.5", file=sys.stderr)
"""


def test_ranks_lines_stay_whole_under_pythonunbuffered(tmp_path):
    log = tmp_path / "stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as err:
        ranks = [subprocess.Popen([sys.executable, "-c", RANK, r], stderr=err, env=env) for r in "01"]
        assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    lines = log.read_text().splitlines()
    whole = re.compile(r"train: rank [01]: fsdp policy: 4/4 parameters, local sum of squares \d+\.5")
    assert len(lines) == 6000
    assert [x for x in lines if not whole.fullmatch(x)] == []
