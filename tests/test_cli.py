"""`spa` as a new user meets it (issue 11), through the real CLI: input checks before any stage, one-line errors
with the documented exit codes, plain progress in a log, stage fingerprints, reports, `spa explain`, umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from spa_operator import warm
from spa_operator.cli import main
from spa_workers import contract, storage

ENV = {"COLUMNS": "80", "LINES": "24"}


def spa(*argv: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spa_operator.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **ENV, **(env or {})}, timeout=timeout)


def write_run(tmp_path: Path, tiny: dict[str, str], count: int = 1, heldout: bool = False,
              **spec: object) -> Path:
    doc = {
        "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "cli", "namespace": "ns"},
        "spec": {
            "model": {"sft": tiny["model"]},
            "data": {"seed": tiny["seed"], "prompts": tiny["prompts"],
                     **({"heldout": tiny["heldout"]} if heldout else {})},
            "iterations": {"count": count, "promptsPerIteration": 16},
            "generation": {"maxNewTokens": 8, "backend": "transformers", "batchSize": 4},
            "training": {"learningRate": 1e-4, "seedEpochs": 1, "batchSize": 8, "maxLength": 128,
                         "maxPromptLength": 64},
            "storage": {"uri": str(tmp_path / "store")},
            "maxRetriesPerStage": 0,
            **spec,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def edit(path: Path, change) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc["spec"])
    path.write_text(yaml.safe_dump(doc))


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------- fast: no stages


def test_plan_names_a_missing_seed_file_and_model(tmp_path, tiny):
    """Issue 11.4: `spa plan` exited 0 with a missing seed file or model."""
    run = write_run(tmp_path, tiny)
    edit(run, lambda s: (s["data"].update(seed="nope.jsonl"), s["model"].update(sft="no-model")))
    proc = spa("plan", str(run))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"spa plan: error: spec.data.seed: {tmp_path / 'nope.jsonl'}: file not found",
        f"spa plan: error: spec.model.sft: {tmp_path / 'no-model'}: no model there (no config.json)"]


def test_plan_lines_are_whole_at_80_columns(tmp_path, tiny):
    """Issue 11.6 (`spa plan` broke commands mid-word) and 11.8 (generation.batchSize reaches the stage)."""
    run = write_run(tmp_path, tiny)
    proc = spa("plan", str(run))
    assert proc.returncode == 0, proc.stderr
    commands = [ln for ln in proc.stdout.splitlines() if ln.startswith("  command: spa-worker generate ")]
    assert len(commands) == 1 and len(commands[0]) > 200
    assert "--slice-start 0 --slice-end 16" in commands[0] and "--batch-size 4" in commands[0]
    assert "iter-00/validate" in proc.stdout and "iter-00/seed-train  (after iter-00/validate)" in proc.stdout


@pytest.mark.parametrize(("field", "expected"), [
    ("training.beta", ["FIELD: spec.training.beta <number>", "default: 0.1; > 0.0; <= 10.0"]),
    ("spec.generation", ["FIELD: spec.generation <object>", "  batchSize <integer>"]),
])
def test_explain_prints_the_field_reference(field, expected):
    """Issue 11.9: no field reference outside a cluster."""
    proc = spa("explain", field)
    assert proc.returncode == 0, proc.stderr
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    assert all(e.strip() in lines for e in expected), proc.stdout


def test_explain_unknown_field_lists_the_known_ones():
    proc = spa("explain", "spec.training.bta")
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert line.startswith("spa explain: spec.training.bta: no such field (fields of spec.training: beta, "
                           "learningRate, seedEpochs, ")


def test_demo_says_it_reuses_a_folder_and_refuses_another_backend(tmp_path, tiny):
    """Issue 11.7: `--backend` was silently ignored once the demo folder existed."""
    example = tmp_path / "example"
    example.mkdir()
    run = write_run(example, tiny, count=0)
    assert run == example / "run.yaml"
    proc = spa("demo", "--out", str(tmp_path), "--backend", "vllm")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"spa demo: error: {tmp_path} holds a demo made with --backend transformers; use another --out folder "
        f"for --backend vllm"]


def test_unwritable_storage_is_one_line(tmp_path, tiny):
    """Issue 11.5: read-only storage ended in a 49-line traceback (root ignores modes: a file blocks the path)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    run = write_run(tmp_path, tiny)
    proc = spa("run", str(run), "--storage", str(blocker))
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"spa run: error: {blocker}/ns/cli") and "Traceback" not in proc.stderr


def test_rerun_from_an_unknown_stage_names_the_stages(tmp_path, tiny):
    run = write_run(tmp_path, tiny, count=0)
    proc = spa("run", str(run), "--rerun-from", "iter-01/train")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "spa run: error: --rerun-from: no stage 'iter-01/train' in this run "
        "(stages: iter-00/validate, iter-00/seed-train)"]
    assert not (tmp_path / "store").exists()  # nothing was started


def test_missing_s3_credentials_are_one_line(tmp_path, tiny, s3_server):
    """Issue 11.5: no S3 credentials printed 79 lines; the endpoint comes from spec.storage (11.2)."""
    run = write_run(tmp_path, tiny)
    edit(run, lambda s: s.update(storage={"uri": "s3://bucket/runs", "endpoint": s3_server}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "SPA_S3_ENDPOINT"}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", **ENV)
    proc = subprocess.run([sys.executable, "-m", "spa_operator.cli", "run", str(run)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert error_lines(proc.stderr) == [
        "spa run: error: storage: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE)"]


def test_operator_without_a_cluster_is_one_line(tmp_path):
    """Issue 11.5: `spa-operator` without a kubeconfig printed a 40-line traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(tmp_path / "none"), HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "spa_operator.kube", "--metrics-port", "0"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert line.startswith("spa-operator: error: no Kubernetes API to talk to: not in a cluster, and no usable "
                           "kubeconfig (KUBECONFIG or ~/.kube/config)")


def test_operator_refuses_a_namespace_pattern_naming_the_flag(tmp_path):
    """The operator lists and watches Jobs and pods in each --namespace by name: a pattern (which kopf would have
    matched for runs only) is refused before anything starts, naming the flag."""
    proc = subprocess.run([sys.executable, "-m", "spa_operator.kube", "--namespace", "ml", "-n", "ml-*"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr)[-1] == ("spa-operator: error: --namespace 'ml-*': not a namespace name "
                                            "(lowercase letters, digits and '-'; no patterns)")


def test_report_honours_the_storage_endpoint_in_the_spec(tmp_path, tiny, s3_env, monkeypatch):
    """Issue 11.2: `spec.storage.endpoint` was ignored by the CLI itself (only SPA_S3_ENDPOINT worked)."""
    run = write_run(tmp_path, tiny)
    endpoint = s3_env["SPA_S3_ENDPOINT"]
    edit(run, lambda s: s.update(storage={"uri": f"s3://{s3_env['BUCKET']}/runs", "endpoint": endpoint}))
    env = {**s3_env, "SPA_S3_ENDPOINT": "", "AWS_ENDPOINT_URL": ""}
    proc = spa("report", str(run), env=env)
    assert proc.returncode == 0, proc.stderr
    root = f"s3://{s3_env['BUCKET']}/runs/ns/cli"
    assert f"wrote {root}/report.md" in proc.stdout
    assert storage.exists(f"{root}/report.json")  # read back through the fixture's endpoint


@pytest.mark.parametrize(("rows", "expected"), [
    ({2: {"prompt": "What is 1 plus 1?", "chosen": "", "rejected": "The answer is 3."}},
     "{seed}: row 3: column chosen is empty"),
    ({0: {"prompt": "What is 1 plus 1?", "chosen": "The answer is 2.", "rejected": "The answer is 2."}},
     "{seed}: row 1: chosen and rejected are the same answer"),
])
def test_plan_check_rejects_unusable_seed_rows(tmp_path, tiny, capsys, rows, expected):
    """Issue 11.3: a seed pair with "chosen": "" was trained on; `spa plan --check` runs the validate checks."""
    seed = tmp_path / "seed.jsonl"
    lines = Path(tiny["seed"]).read_text().splitlines()
    for n, row in rows.items():
        lines[n] = json.dumps(row)
    seed.write_text("\n".join(lines) + "\n")
    run = write_run(tmp_path, tiny)
    edit(run, lambda s: s["data"].update(seed=str(seed)))
    assert main(["plan", str(run), "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "spa plan: error: " + expected.format(seed=seed)]


def test_plan_check_counts_the_prompts_every_iteration_needs(tmp_path, tiny, capsys):
    """Issue 11.3: asking for 100 prompts from a 64-prompt file quietly used 64."""
    run = write_run(tmp_path, tiny, count=2)
    edit(run, lambda s: s["iterations"].update(promptsPerIteration=[50, 50]))
    assert main(["plan", str(run), "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"spa plan: error: {tiny['prompts']}: has 64 prompts but the iterations need 100 "
        f"(spec.iterations.promptsPerIteration)"]
    edit(run, lambda s: s["iterations"].update(promptsPerIteration=[32, 32]))
    assert main(["plan", str(run), "--check"]) == 0
    assert "spa plan: inputs OK (32 seed pairs, 64 prompts;" in capsys.readouterr().err


def _earlier_run(root: Path) -> None:
    """The manifests of an earlier run (one iteration, two generate shards): what --rates-from reads."""
    def put(stage_dir: str, ledger: dict) -> None:
        d = root / stage_dir
        d.mkdir(parents=True)
        (d / contract.MANIFEST).write_text(contract.StageManifest(stage=stage_dir.split("/")[1], files={},
                                                                  ledger=ledger).to_json())

    L = contract.Ledger
    put("iter-00/validate", {L.GOLD_LABELS: 32, L.CPU_SECONDS: 36})
    put("iter-00/seed-train", {L.PAIRS_TRAINED: 32, L.ACCELERATOR_SECONDS: 64, L.CPU_SECONDS: 72})
    for shard in (0, 1):  # 10 prompts, 20 answers of 6 tokens: 0.5 GPU-s a token
        put(f"iter-01/generate/shard-{shard:05d}-of-00002", {L.PROMPTS: 5, L.ANSWERS_GENERATED: 10,
                                                            L.TOKENS_GENERATED: 60, L.ACCELERATOR_SECONDS: 30})
    put("iter-01/judge/shard-00000-of-00001", {L.PAIRS_JUDGED: 8, L.TOKENS_SCORED: 400, L.ACCELERATOR_SECONDS: 40})
    put("iter-01/train", {L.PAIRS_TRAINED: 8, L.ACCELERATOR_SECONDS: 16})


def test_plan_prints_expected_totals_and_gpu_hours_at_an_earlier_runs_rates(tmp_path, tiny, capsys):
    """Before a run: the stages and bounds; with --rates-from, the tokens, pairs and GPU-hours the earlier run's
    measured rates give for this plan (2 iterations of 16 prompts, 2 answers each, seed 32 pairs x 1 epoch)."""
    run = write_run(tmp_path, tiny, count=2)
    assert main(["plan", str(run)]) == 0
    out = capsys.readouterr().out.split("expected totals")[1]
    assert "stages: 8  (1 validate, 1 seed-train, 2 generate, 2 judge, 2 train)" in out
    assert "gold labels: 32  (seed 32)" in out and "prompts, answers: 32, 64" in out
    assert "tokens generated: at most 512  (64 answers x maxNewTokens 8)" in out
    _earlier_run(tmp_path / "old")
    assert main(["plan", str(run), "--rates-from", str(tmp_path / "old")]) == 0
    out = capsys.readouterr().out.split("expected totals")[1]
    assert "tokens generated: ~384  (6.0 per answer" in out  # 64 answers x 6 tokens
    assert "pairs judged: ~26  (80.0% of prompts kept" in out  # 32 prompts x 8/10
    # GPU-s: validate 0 + seed 2/pair x 32 + generate 0.5/token x 384 + judge 0.1/token x (32 x 40 tokens/prompt)
    # + train 2/pair x 25.6 pairs = 64 + 192 + 128 + 51.2 = 435.2 s
    assert f"GPU-hours: ~{435.2 / 3600:.3g}" in out
    assert main(["plan", str(run), "--rates-from", str(tmp_path / "nowhere")]) == 2
    assert "--rates-from" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ slow: stages run


@pytest.mark.slow
def test_bad_prompts_fail_in_validate_before_training_with_exit_2(tmp_path, tiny, s3_env):
    """Issue 11.4 (a broken prompts file failed after seed-train and evaluate), 11.5 (bad data: exit 1, not 2),
    11.6 (the log path cut at 80 columns), on S3 storage whose endpoint only the spec names (11.2)."""
    prompts = tmp_path / "prompts.jsonl"
    lines = Path(tiny["prompts"]).read_text().splitlines()
    lines[40] = '{"text": "no prompt column"}'
    prompts.write_text("\n".join(lines) + "\n")
    run = write_run(tmp_path, tiny, heldout=True)
    bucket, endpoint = s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"]
    edit(run, lambda s: (s["data"].update(prompts=str(prompts)),
                         s.update(storage={"uri": f"s3://{bucket}/runs", "endpoint": endpoint})))
    logs = tmp_path / ("a-long-folder-name-for-the-logs-" * 3)
    proc = spa("run", str(run), "--logs", str(logs), env={**s3_env, "SPA_S3_ENDPOINT": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    stage_logs = sorted(p.name for p in logs.iterdir() if p.name != warm.SERVER_LOG)  # and the warm server's
    assert stage_logs == ["iter-00-validate-a1.log"]  # nothing else ran
    failed = [ln for ln in proc.stdout.splitlines() if "iter-00/validate: failed (exit 2)" in ln]
    assert len(failed) == 1 and failed[0].endswith(f"; log: {logs / 'iter-00-validate-a1.log'}"), proc.stdout
    assert f"{prompts}: row 41: missing column prompt" in failed[0]
    assert not storage.exists(f"s3://{bucket}/runs/ns/cli/iter-00/seed-train/{contract.MANIFEST}")


def _sigint_default() -> None:
    # A shell starts background jobs (`pytest ... &`) with SIGINT ignored, and children inherit that: the run would
    # never see the Ctrl-C this test sends. A terminal's foreground job has the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_progress_reaches_a_log_file(tmp_path, tiny):
    """Issue 11.5 (Ctrl-C: a traceback, no hint that rerunning resumes) and 11.6 (`spa run > log` wrote 0 bytes
    while stages ran); outputs follow the umask (11.9)."""
    run = write_run(tmp_path, tiny)
    log = tmp_path / "spa.log"
    old_mask = os.umask(0o022)
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "spa_operator.cli", "run", str(run)], stdout=fh,
                                    stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
                                    start_new_session=True, preexec_fn=_sigint_default)
    finally:
        os.umask(old_mask)
    deadline = time.time() + 120
    while "iter-00/validate: started" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "iter-00/validate: started" in log.read_text()  # on disk while the run goes on
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert error_lines(stderr) == ["spa run: interrupted; rerun the same command to resume"]
    snapshot = tmp_path / "store" / "ns" / "cli" / "run.yaml"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o644
