"""The Dockerfiles, statically (no Docker engine here): pinned bases, non-root users, and the extras, entrypoints and
files they use exist in this project."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def pip_extras(path: Path) -> set[str]:
    extras = set()
    for op, rest in instructions(path):
        if op == "RUN" and "pip install" in rest:
            for word in shlex.split(rest):
                m = re.fullmatch(r"\.\[([\w,-]+)\]", word)
                if m:
                    extras |= set(m.group(1).split(","))
    return extras


@pytest.mark.parametrize(("dockerfile", "base", "extras", "entrypoint"), [
    ("Dockerfile", "python:", {"operator"}, "spa-operator"),
    ("Dockerfile.worker", "nvidia/cuda:", {"worker", "vllm", "deepspeed"}, "spa-worker"),
])
def test_dockerfile_uses_what_exists(dockerfile, base, extras, entrypoint):
    path = ROOT / dockerfile
    ins = instructions(path)
    (frm,) = [rest for op, rest in ins if op == "FROM"]
    assert frm.startswith(base)
    tag = frm.split(":", 1)[1]
    assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"unpinned base image {frm}"
    assert pip_extras(path) == extras
    assert extras <= set(PYPROJECT["project"]["optional-dependencies"])
    (ep,) = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert ep == f'["{entrypoint}"]' and entrypoint in PYPROJECT["project"]["scripts"]
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    for op, rest in ins:
        if op == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"


def test_worker_image_brings_the_training_and_serving_stack():
    deps = PYPROJECT["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for extra in ("worker", "vllm") for d in deps[extra]}
    assert {"torch", "vllm", "trl", "peft", "prometheus-client"} <= names
    operator = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in deps["operator"]}
    assert "torch" not in operator and {"kopf", "kubernetes", "prometheus-client"} <= operator


def test_operator_image_user_matches_the_chart():
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "spa-operator" / "values.yaml").read_text())
    users = [rest for op, rest in instructions(ROOT / "Dockerfile") if op == "USER"]
    assert users[-1] == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    ports = [rest for op, rest in instructions(ROOT / "Dockerfile") if op == "EXPOSE"]
    assert ports == [str(values["metrics"]["port"])]
