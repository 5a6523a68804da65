"""Helpers for the chart and monitoring tests: the tools CI installs (scripts/install-tools.sh), rendering the chart,
PromQL metric names, and live /metrics scrapes of the operator and the worker endpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spa-operator"
DASHBOARD = CHART / "dashboards" / "spa-operator.json"
MONITORING_API = "monitoring.coreos.com/v1"
# Every toggle on; watchNamespaces set, so the per-namespace Roles render too (the default renders the ClusterRole).
ALL_ON = ["--api-versions", MONITORING_API, "--set", "metrics.serviceMonitor.enabled=true",
          "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
          "--set", "dashboard.enabled=true"]
ALL_ON_NAMESPACED = [*ALL_ON, "--set", "watchNamespaces={ml,research}"]


def tool(name: str) -> str:
    """A binary from PATH or .tools/bin (scripts/install-tools.sh). Missing: the test is skipped with the reason, or
    fails where SPA_REQUIRE_TOOLS is set (.ci/run sets it, so CI never passes by skipping)."""
    found = shutil.which(name) or shutil.which(name, path=str(ROOT / ".tools" / "bin"))
    if not found:
        message = f"{name} not installed: run scripts/install-tools.sh (CI does)"
        if os.environ.get("SPA_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def helm_template(*args: str, include_crds: bool = True) -> list[dict[str, Any]]:
    argv = [tool("helm"), "template", "spa", str(CHART), "--namespace", "spa-system", *args]
    if include_crds:
        argv.append("--include-crds")
    r = run(*argv)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions (rows have none), plus the template variables' label_values queries."""
    out: dict[str, list[str]] = {}
    for p in dashboard()["panels"]:
        exprs = [t["expr"] for t in p.get("targets", []) if t.get("expr")]
        if exprs:
            out[p["title"]] = exprs
    for v in dashboard()["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", v.get("query", "") if isinstance(v.get("query"), str) else "")
        if m:
            out[f"${v['name']}"] = [m.group(1)]
    return out


# Grafana's variables, as a query sent with "All" selected would have them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$namespace": ".*", "$run": ".*"}


def concrete(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are neither functions, keywords nor labels)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0) in _NOT_METRICS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group(0))
    return names


def exposed_names(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition, including the series of families that have none yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names |= {name}
            names |= {"histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                      "summary": {f"{name}_sum", f"{name}_count"},
                      "counter": {f"{name}_total"}}.get(kind, set())
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode()


def write_rule_file(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path
