"""Never lose a user's work (issue 19, items 1): inputs are checked before any verdict on finished outputs, what
`--rerun-from` / `--force` / SPA_OVERWRITE_STALE=1 replace is listed and moved aside, and deleted only once its
replacement has succeeded. Through the real `spa` and `spa-worker` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from spa_operator.local import StageCheck, StageStatus
from spa_operator.planner import stage_graph
from spa_operator.rerun import Decision, decide
from spa_operator.spec import parse_run
from spa_workers import aside, contract, storage
from test_cli import edit, error_lines, spa, write_run

# ---------------------------------------------------------------------------------------------- the decision


def _graph():
    doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"sft": "/m"}, "data": {"seed": "/s.jsonl", "prompts": "/p.jsonl"},
                    "iterations": {"count": 1, "promptsPerIteration": 8}}}
    return stage_graph(parse_run(doc).spec, "/store")


def _statuses(graph, stale=(), missing=()):
    def check(key):
        return StageCheck.STALE if key in stale else StageCheck.MISSING if key in missing else StageCheck.DONE
    return {s.key: StageStatus(s.key, check(s.key)) for s in graph}


SEED, GEN, JUDGE, TRAIN = "iter-00/seed-train", "iter-01/generate", "iter-01/judge", "iter-01/train"


@pytest.mark.parametrize(("stale", "rerun_from", "force", "expected"), [
    ((), None, False, Decision()),
    ((SEED, GEN, JUDGE, TRAIN), None, False, Decision(refused=(SEED, GEN, JUDGE, TRAIN))),
    ((SEED, GEN, JUDGE, TRAIN), None, True, Decision(set_aside=(SEED, GEN, JUDGE, TRAIN))),
    ((JUDGE, TRAIN), None, True, Decision(set_aside=(JUDGE, TRAIN))),  # --force: only the stale ones
    ((), GEN, False, Decision(set_aside=(GEN, JUDGE, TRAIN))),  # --rerun-from: that stage and every one after
    ((JUDGE, TRAIN), GEN, False, Decision(set_aside=(GEN, JUDGE, TRAIN))),
    ((SEED,), JUDGE, False, Decision(set_aside=(JUDGE, TRAIN), refused=(SEED,))),  # stale before it: refused
])
def test_what_is_set_aside(stale, rerun_from, force, expected):
    graph = _graph()
    assert decide(graph, _statuses(graph, stale), rerun_from, force) == expected


# ------------------------------------------------------------------------------------ fast: the CLI, the worker


def test_rerun_from_with_force_is_refused(tmp_path, tiny):
    run = write_run(tmp_path, tiny, count=0)
    proc = spa("run", str(run), "--rerun-from", "iter-00/seed-train", "--force")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "spa run: error: --rerun-from and --force do not go together: --rerun-from redoes a stage and every one "
        "after it, --force only the stages made with other settings; give one"]
    assert not (tmp_path / "store").exists()  # nothing was started


def test_render_for_a_cluster_warns_about_local_paths(tmp_path, tiny):
    """A Job's pod cannot read this machine's files: each local path is one warning line naming its field."""
    run = write_run(tmp_path, tiny, count=0, heldout=True)
    proc = spa("render", str(run), "--storage", "s3://bucket/runs")
    assert proc.returncode == 0, proc.stderr
    fields = ["spec.data.seed", "spec.data.prompts", "spec.data.heldout", "spec.model.sft"]
    assert error_lines(proc.stderr) == [
        f"spa render: warning: {field}: {uri} is a local path: the worker pods read it from their own filesystem "
        "(their image or a mounted volume), not from this machine; use s3:// (or hf:// for a model) for files that "
        "are here" for field, uri in zip(fields, [tiny["seed"], tiny["prompts"], tiny["heldout"], tiny["model"]],
                                         strict=True)]
    assert "kind: Job" in proc.stdout
    edit(run, lambda s: (s.update(model={"sft": "hf://org/model"}),
                         s.update(data={"seed": "s3://b/s.jsonl", "prompts": "s3://b/p.jsonl"})))
    clean = spa("render", str(run), "--storage", "s3://bucket/runs")
    assert clean.returncode == 0 and error_lines(clean.stderr) == []


def test_worker_overwrite_stale_moves_the_old_outputs_aside_until_it_succeeds(tmp_path, tiny, worker):
    """SPA_OVERWRITE_STALE=1 used to delete a stale output before redoing it: a failing redo lost it."""
    out = tmp_path / "run" / "iter-00" / "validate"
    seed = tmp_path / "seed.jsonl"
    shutil.copy(tiny["seed"], seed)
    argv = ["validate", "--model", tiny["model"], "--seed-pairs", str(seed), "--prompts", tiny["prompts"],
            "--output", str(out)]
    assert worker(*argv).returncode == 0
    old = {rel: (out / rel).read_bytes() for rel in storage.list_files(str(out))}
    seed.write_text(seed.read_text() + "not json\n")  # changed, and broken
    failed = worker(*argv, env={"SPA_OVERWRITE_STALE": "1"})
    assert failed.returncode == 2, failed.stderr
    (kept,) = aside.set_aside_under(str(out.parent))
    assert f"moved {out} aside to {kept} (deleted once this stage succeeds)" in failed.stderr
    assert {rel: Path(kept, rel).read_bytes() for rel in storage.list_files(kept)} == old  # recoverable
    shutil.copy(tiny["seed"], seed)
    with seed.open("a") as fh:  # changed again, and usable
        fh.write(json.dumps({"prompt": "one more", "chosen": "yes", "rejected": "no"}) + "\n")
    assert worker(*argv, env={"SPA_OVERWRITE_STALE": "1"}).returncode == 0
    assert (out / contract.MANIFEST).is_file()
    assert aside.set_aside_under(str(out.parent)) == []  # replaced: the old outputs are gone only now


# -------------------------------------------------------------------------------------------- a finished run


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished run (validate, seed-train, evaluate), made once; each test works on its own copy."""
    base = tmp_path_factory.mktemp("finished")
    proc = spa("run", str(write_run(base, tiny, count=0, heldout=True)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "store"


def _copy(finished: Path, tmp_path: Path, tiny) -> tuple[Path, Path]:
    shutil.copytree(finished, tmp_path / "store")
    return write_run(tmp_path, tiny, count=0, heldout=True), tmp_path / "store" / "ns" / "cli"


def manifests(root: Path) -> dict[str, bytes]:
    """Every stage manifest in its place (not the ones set aside), by path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob(contract.MANIFEST)
            if aside.DISCARDED not in p.parts}


@pytest.mark.slow
def test_a_missing_or_broken_input_is_named_and_nothing_is_set_aside(finished, tmp_path, tiny):
    """Issue 19.1: pointing data.seed of a finished run at a missing file said "made with other settings", and the
    advice it gave (--rerun-from iter-00/validate) deleted every finished stage before validate found the typo."""
    run, root = _copy(finished, tmp_path, tiny)
    before = manifests(root)
    assert len(before) == 3
    again = spa("run", str(run))  # the copy is the same run: nothing to do
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout
    typo = tmp_path / "seeds.jsonl"
    edit(run, lambda s: s["data"].update(seed=str(typo)))
    for flags in ([], ["--rerun-from", "iter-00/validate"], ["--force"]):
        proc = spa("run", str(run), *flags)
        assert proc.returncode == 2
        assert error_lines(proc.stderr) == [f"spa run: error: spec.data.seed: {typo}: file not found"], flags
        assert manifests(root) == before
    typo.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')  # there, but broken
    for flags in ([], ["--rerun-from", "iter-00/validate"], ["--force"]):
        proc = spa("run", str(run), *flags)
        assert proc.returncode == 2
        assert error_lines(proc.stderr) == [
            f"spa run: error: spec.data.seed: {typo}: row 2: not valid JSON (Expecting value)"], flags
        assert manifests(root) == before
    edit(run, lambda s: (s["data"].update(seed=tiny["seed"]), s["model"].update(sft=str(tmp_path / "modle"))))
    proc = spa("run", str(run), "--rerun-from", "iter-00/seed-train")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"spa run: error: spec.model.sft: {tmp_path / 'modle'}: no model there (no config.json)"]
    assert manifests(root) == before
    assert not any(p.name == aside.DISCARDED for p in root.rglob("*"))


@pytest.mark.slow
def test_rerun_from_lists_and_sets_aside_and_deletes_only_after_success(finished, tmp_path, tiny, worker):
    """Issue 11.1 (a changed manifest reused the old model) and 19.1: --rerun-from discarded outputs up front."""
    run, root = _copy(finished, tmp_path, tiny)
    assert json.loads((root / "iter-00/seed-train" / contract.MANIFEST).read_text())[
        "fingerprint_of"]["args"]["learning_rate"] == 1e-4
    for name in ("report.md", "report.json", "report.svg"):  # issue 11.9: a saved report
        assert (root / name).is_file()
    edit(run, lambda s: s["training"].update(learningRate=2e-4))
    stale = spa("run", str(run))
    assert stale.returncode == 2
    assert error_lines(stale.stderr) == [  # the manifest's field, not the worker's argument (issue 19)
        f"spa run: error: iter-00/seed-train in {root} was made with other settings: "
        "spec.training.learningRate 0.0001 -> 0.0002",
        "spa run: error: 1 stage(s) after it took their outputs: iter-00/evaluate",
        "spa run: to redo them here, rerun with --rerun-from iter-00/seed-train (that stage and every one after it) "
        "or --force (only the stale ones); to keep the old results, use another --storage folder"]
    # The worker, as an operator's Job would run it, refuses the mismatching manifest the same way.
    from spa_operator.cli import _load

    loaded, root_uri = _load(str(run), None)
    proc = worker(*stage_graph(loaded.spec, root_uri)[1].args.to_argv())
    assert proc.returncode == 2
    assert (f"spa-worker seed-train: error: {root / 'iter-00' / 'seed-train'} holds outputs made with other "
            f"settings (learning_rate 0.0001 -> 0.0002)") in proc.stderr

    old = manifests(root)
    again = spa("run", str(run), "--rerun-from", "iter-00/seed-train")
    assert again.returncode == 0, again.stderr[-3000:]
    lines = error_lines(again.stderr)
    files = {k: len(storage.list_files(str(finished / "ns" / "cli" / k))) for k in ("iter-00/seed-train",
                                                                                     "iter-00/evaluate")}
    assert lines[0] == (f"spa run: setting aside the outputs of iter-00/seed-train ({files['iter-00/seed-train']} "
                        f"files), iter-00/evaluate ({files['iter-00/evaluate']} files): each moves to .discarded/"
                        "<time>/ in its iteration folder, deleted once its stage succeeds again")
    moved = [ln.split(" -> ")[1] for ln in lines[1:3]]
    assert lines[1:3] == [f"spa run: {k} -> {to}" for k, to in zip(files, moved, strict=True)]
    assert [aside.origin(to) for to in moved] == [str(root / k) for k in files]
    assert "iter-00/validate: started" not in again.stdout  # unchanged stages are kept
    assert json.loads((root / "iter-00/seed-train" / contract.MANIFEST).read_text())[
        "fingerprint_of"]["args"]["learning_rate"] == 2e-4
    new = manifests(root)
    assert new.keys() == old.keys() and new["iter-00/validate/_SUCCESS.json"] == old["iter-00/validate/_SUCCESS.json"]
    assert not any(Path(to).exists() for to in moved)  # replaced: deleted only now
    assert not (root / "iter-00" / aside.DISCARDED).exists()
    report = spa("report", str(root))
    assert report.returncode == 0 and f"wrote {root / 'report.svg'}" in report.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_failing_replacement_leaves_the_old_outputs_recoverable(finished, tmp_path, tiny, backend, request):
    """--force on a manifest whose seed-train then fails: the old outputs stay set aside, reported, and moving them
    back restores the finished run. On S3 too, where a move is copies first, then deletes."""
    run, root = _copy(finished, tmp_path, tiny)
    flags, env = ["--logs", str(tmp_path / "logs")], {}
    where = str(root)
    if backend == "s3":
        s3_env = request.getfixturevalue("s3_env")
        uri = f"s3://{s3_env['BUCKET']}/runs"
        storage.upload_dir(str(tmp_path / "store"), uri)
        shutil.rmtree(tmp_path / "store")
        flags += ["--storage", uri]
        env, where = s3_env, f"{uri}/ns/cli"
    before = {rel: storage.read_bytes(storage.join(where, rel)) for rel in storage.list_files(where)
              if rel.endswith(contract.MANIFEST)}
    assert len(before) == 3
    edit(run, lambda s: s["training"].update(maxPromptLength=4))  # every seed prompt is longer: seed-train fails
    proc = spa("run", str(run), "--force", *flags, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "every prompt is longer than --max-prompt-length 4" in proc.stderr
    kept = [ln for ln in error_lines(proc.stderr) if " -> " in ln]
    moved = {ln.split(": ", 1)[1].split(" -> ")[0]: ln.split(" -> ")[1] for ln in kept}
    assert sorted(moved) == ["iter-00/evaluate", "iter-00/seed-train"]
    assert error_lines(proc.stderr)[-1] == (
        "spa run: kept the old outputs of iter-00/seed-train, iter-00/evaluate (their stage has not succeeded "
        f"again): {moved['iter-00/seed-train']}, {moved['iter-00/evaluate']}; move one back in place of its stage "
        "folder to restore it")
    for key, to in moved.items():
        assert storage.read_bytes(storage.join(to, contract.MANIFEST)) == before[f"{key}/{contract.MANIFEST}"]
        assert not storage.exists(storage.join(where, key, contract.MANIFEST))
    # restore: the old manifest, and the outputs moved back
    edit(run, lambda s: s["training"].update(maxPromptLength=64))
    for key, to in moved.items():
        storage.delete_tree(storage.join(where, key))
        storage.move_tree(to, storage.join(where, key))
    done = spa("run", str(run), *flags, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started" not in done.stdout, done.stdout  # every stage was back: nothing ran
    assert {rel: storage.read_bytes(storage.join(where, rel)) for rel in storage.list_files(where)
            if rel.endswith(contract.MANIFEST) and aside.DISCARDED not in rel} == before
