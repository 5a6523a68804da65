"""The storage layer and the stage contract, on local disk and against a real S3 endpoint (moto server)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from spa_workers import contract, storage
from spa_workers.contract import GenerateArgs, StageInputError
from spa_workers.runner import run_stage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A storage root URI on each backend (the S3 one is a fresh bucket on the moto server)."""
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        env = request.getfixturevalue("s3_env")
        yield f"s3://{env['BUCKET']}/prefix"


def test_read_write_exists_list(root):
    assert not storage.exists(storage.join(root, "a.txt"))
    storage.write_text(storage.join(root, "a.txt"), "hello")
    storage.write_bytes(storage.join(root, "d1", "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "d2", "deep", "c.json"), "{}")
    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.read_text(storage.join(root, "a.txt")) == "hello"
    assert storage.read_bytes(storage.join(root, "d1/b.bin")) == b"\x00\x01"
    assert storage.list_files(root) == ["a.txt", "d1/b.bin", "d2/deep/c.json"]
    assert [d.rsplit("/", 1)[1] for d in storage.list_dirs(root)] == ["d1", "d2"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    storage.delete_tree(storage.join(root, "d2"))
    storage.delete_tree(storage.join(root, "a.txt"))
    storage.delete_tree(storage.join(root, "never-there"))
    assert storage.list_files(root) == ["d1/b.bin"]


def test_upload_download_dir_and_etag(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("y")
    storage.upload_dir(str(src), storage.join(root, "model"))
    tag1 = storage.etag(storage.join(root, "model"))
    dest = tmp_path / "dest"
    storage.download_dir(storage.join(root, "model"), str(dest))
    assert (dest / "sub" / "y.txt").read_text() == "y"
    time.sleep(0.01)
    storage.write_text(storage.join(root, "model", "x.txt"), "changed")
    assert storage.etag(storage.join(root, "model")) != tag1
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(root, "nothing"), str(tmp_path / "n"))


def test_multipart_upload_round_trips(s3_env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part size
    data = os.urandom(11 * 1024 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    uri = f"s3://{s3_env['BUCKET']}/big.bin"
    storage.upload_file(str(path), uri)
    head = boto3.client("s3", endpoint_url=s3_env["SPA_S3_ENDPOINT"]).head_object(Bucket=s3_env["BUCKET"],
                                                                                   Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts: multipart was used
    storage.download_file(uri, str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data


def test_unreachable_s3_is_a_storage_error(monkeypatch):
    monkeypatch.setenv("SPA_S3_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.reset_client()
    try:
        with pytest.raises(storage.StorageError, match="S3 unreachable"):
            storage.exists("s3://bucket/key")
    finally:
        storage.reset_client()


def _args(root: str) -> GenerateArgs:
    return GenerateArgs(policy="p", prompts="x.jsonl", output=storage.join(root, "gen"), shard_index=0)


def test_manifest_written_last_and_rerun_is_noop(root):
    calls = []

    def body(work):
        calls.append(1)
        with open(os.path.join(work.dir, contract.RESPONSES_FILE), "w") as fh:
            fh.write('{"a": 1}\n')
        work.counts["prompts"] = 1

    args = _args(root)
    assert run_stage(args, body) == 0
    (m,) = contract.read_stage_manifests(args)
    assert m.counts == {"prompts": 1}
    assert m.files[contract.RESPONSES_FILE]["bytes"] == 9
    out = contract.shard_dir(args.output, 0, 1)
    assert storage.read_text(storage.join(out, contract.RESPONSES_FILE)) == '{"a": 1}\n'
    assert contract.finished_shard_dirs(args.output) == [out]
    assert run_stage(args, body) == 0
    assert len(calls) == 1


KILLED_STAGE = textwrap.dedent("""
    import os, sys, time
    from spa_workers.contract import GenerateArgs
    from spa_workers.runner import run_stage

    def body(work):
        with open(os.path.join(work.dir, "responses.jsonl"), "w") as fh:
            fh.write("partial\\n")
        work.progress(1, 10, force=True)
        print("WROTE", flush=True)
        time.sleep(60)

    run_stage(GenerateArgs(policy="p", prompts="x.jsonl", output=sys.argv[1], shard_index=0), body)
""")


def test_stage_killed_before_manifest_leaves_nothing_a_reader_takes(root, tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(KILLED_STAGE)
    args = _args(root)
    proc = subprocess.Popen([sys.executable, str(script), args.output], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    assert proc.stdout.readline().strip() == "WROTE"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert contract.read_stage_manifests(args) is None
    with pytest.raises(StageInputError, match="0 of 1 shards finished"):
        contract.finished_shard_dirs(args.output)
    shard = contract.shard_dir(args.output, 0, 1)
    # The heartbeat is there (it is meant to be), the half-written output is not.
    assert json.loads(storage.read_text(storage.join(shard, contract.PROGRESS)))["fraction"] == 0.1
    assert not storage.exists(storage.join(shard, contract.RESPONSES_FILE))
    # A rerun completes and cleans up the killed attempt's scratch.
    assert run_stage(args, lambda w: open(os.path.join(w.dir, "responses.jsonl"), "w").close()) == 0
    assert contract.finished_shard_dirs(args.output) == [shard]
    assert [f for f in storage.list_files(shard) if "work" in f] == []


RESOLVE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from spa_workers import modeling, storage

    real = storage.download_dir

    def counted(uri, local_dir):  # count the downloads; slow them so that the resolvers overlap
        with open(os.environ["COUNTER"], "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        real(uri, local_dir)

    storage.download_dir = counted
    while time.time() < float(os.environ["START_AT"]):  # all four ask at the same moment, like a pod's ranks
        time.sleep(0.01)
    print(modeling.resolve_model(sys.argv[1]))
""")


def test_processes_of_a_pod_download_a_model_once(s3_env, tiny, tmp_path):
    uri = f"s3://{s3_env['BUCKET']}/models/tiny"
    storage.upload_dir(tiny["model"], uri)
    cache, counter = tmp_path / "cache", tmp_path / "downloads.txt"
    env = {**os.environ, **s3_env, "SPA_CACHE_DIR": str(cache), "COUNTER": str(counter),
           "START_AT": str(time.time() + 5)}
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE_SCRIPT, uri], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    dests = {o[0].strip() for o in outs}
    assert len(dests) == 1 and len(counter.read_text().split()) == 1  # one download, four users
    (dest,) = dests
    assert sorted(os.listdir(dest)) == sorted([*os.listdir(tiny["model"]), storage.COMPLETE])
    assert [n for n in os.listdir(cache / "models") if ".part" in n] == []


def test_partial_copies_of_a_dead_downloader_are_cleaned(s3_env, tiny, tmp_path, monkeypatch):
    from spa_workers import modeling

    uri = f"s3://{s3_env['BUCKET']}/models/tiny"
    storage.upload_dir(tiny["model"], uri)
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    dest = modeling.resolve_model(uri)
    storage.delete_tree(dest)  # start over, with the leftovers of two killed downloaders (old and new naming)
    os.makedirs(dest + ".part/sub")
    os.makedirs(dest + ".part-4242")
    long_ago = time.time() - 2 * storage.STALE_PART_S  # nobody has written to them since
    for path in (dest + ".part/sub", dest + ".part", dest + ".part-4242"):
        os.utime(path, (long_ago, long_ago))
    os.makedirs(dest + ".part-other-pod-77/sub")  # another pod's download in progress (its lock did not hold us)
    os.makedirs(dest)  # renamed but never marked complete (an older version fetched into place)
    assert modeling.resolve_model(uri) == dest
    assert os.path.exists(os.path.join(dest, "config.json"))
    assert [n for n in os.listdir(os.path.dirname(dest)) if ".part" in n] == [os.path.basename(dest) +
                                                                            ".part-other-pod-77"]


def test_two_fetchers_whose_lock_does_not_hold_never_write_the_same_folder(tmp_path):
    """A ReadWriteMany cache whose POSIX locks do not work across nodes (NFS mounted nolock, FUSE object stores)
    lets two pods fetch the same model at once. Stand-in: two threads of one process, whom a POSIX record lock does
    not exclude either (it belongs to the process). Each must write its own folder, and the copy in place must be one
    whole copy: never a mix, never a folder deleted under the other's writes."""
    dest = str(tmp_path / "models" / "m")
    started, seen = threading.Barrier(2, timeout=30), []

    def fetch(tmp: str) -> None:
        os.makedirs(tmp)
        seen.append(tmp)
        started.wait()  # both are fetching now: the lock held neither back
        for i in range(20):
            Path(tmp, f"shard-{i}").write_text(tmp)  # each file says who wrote it
            time.sleep(0.005)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: storage.fetch_once(dest, fetch), range(2)))
    assert results == [dest, dest] and len(set(seen)) == 2  # both fetched, each into its own folder
    writers = {Path(dest, f"shard-{i}").read_text() for i in range(20)}
    assert len(writers) == 1 and os.path.exists(os.path.join(dest, storage.COMPLETE))  # one whole copy
    assert [n for n in os.listdir(tmp_path / "models") if ".part" in n] == []  # the loser dropped its copy


def test_a_filesystem_that_refuses_locks_still_fetches(tmp_path, monkeypatch):
    def no_locks(fh, op):  # e.g. NFS without a lock manager: lockf fails with ENOLCK
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(storage.fcntl, "lockf", no_locks)
    dest = storage.fetch_once(str(tmp_path / "m"), lambda tmp: (os.makedirs(tmp), Path(tmp, "w").write_text("x")))
    assert Path(dest, "w").read_text() == "x"


def test_failed_download_leaves_no_partial_file(s3_env, tmp_path, monkeypatch):
    uri = f"s3://{s3_env['BUCKET']}/big.bin"
    storage.write_bytes(uri, os.urandom(1 << 20))

    def broken(*args, **kwargs):
        Path(args[2]).write_bytes(b"half")
        raise storage.StorageError("S3 unreachable: ConnectionClosedError")

    monkeypatch.setattr(storage._client(), "download_file", broken)
    with pytest.raises(storage.StorageError):
        storage.download_file(uri, str(tmp_path / "big.bin"))
    assert os.listdir(tmp_path) == []


def test_large_s3_outputs_are_identified_by_their_etag_not_hashed_again(root):
    """Issue 21.2: publishing a model read every weight file once more to hash it (~1.5 s for 538 MB, minutes at
    14.5 GB). On S3 a file above the multipart threshold is identified by the ETag S3 computed from the bytes it
    received; small files, and every local output, keep their sha256."""
    big = os.urandom(1024) * (contract.ETAG_IDENTIFIES_ABOVE // 1024 + 1)

    def body(work):
        os.makedirs(os.path.join(work.dir, "model"))
        with open(os.path.join(work.dir, "model", "model.safetensors"), "wb") as fh:
            fh.write(big)
        with open(os.path.join(work.dir, contract.RESPONSES_FILE), "w") as fh:
            fh.write('{"a": 1}\n')

    args = _args(root)
    assert run_stage(args, body) == 0
    (m,) = contract.read_stage_manifests(args)
    out = contract.shard_dir(args.output, 0, 1)
    assert m.files[contract.RESPONSES_FILE] == {"bytes": 9, "sha256": hashlib.sha256(b'{"a": 1}\n').hexdigest()}
    weights = m.files["model/model.safetensors"]
    if storage.is_s3(root):
        bucket, key = storage.split_s3(storage.join(out, "model/model.safetensors"))
        head = storage._client().head_object(Bucket=bucket, Key=key)
        assert weights == {"bytes": len(big), "etag": head["ETag"].strip('"'),
                           "part_bytes": storage.MULTIPART_THRESHOLD}
        # the ETag names the content: the MD5 of the parts' MD5s, for parts of part_bytes
        parts = [hashlib.md5(big[i: i + storage.MULTIPART_THRESHOLD]).digest()
                 for i in range(0, len(big), storage.MULTIPART_THRESHOLD)]
        assert weights["etag"] == f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
    else:
        assert weights == {"bytes": len(big), "sha256": hashlib.sha256(big).hexdigest()}


def test_move_tree_and_set_aside(root):
    """Moving a stage's outputs aside (aside.py) keeps every file, byte for byte; on S3 (no rename) the copies are
    made before any source is deleted, and nothing is left at the source."""
    from spa_workers import aside

    stage = storage.join(root, "iter-00", "seed-train")
    files = {"model/config.json": "{}", "model/weights.bin": "w" * 1000, contract.MANIFEST: "{}"}
    for rel, text in files.items():
        storage.write_text(storage.join(stage, rel), text)
    moved = aside.move_aside(stage, "20250101T000000Z")
    assert moved == storage.join(root, "iter-00", aside.DISCARDED, "20250101T000000Z", "seed-train")
    assert aside.origin(moved) == stage
    assert storage.list_files(stage) == []
    assert {rel: storage.read_text(storage.join(moved, rel)) for rel in storage.list_files(moved)} == files
    assert aside.move_aside(stage, "20250101T000000Z") is None  # nothing there: nothing moved
    storage.write_text(storage.join(stage, contract.MANIFEST), "{}")  # a second move in the same second
    again = aside.move_aside(stage, "20250101T000000Z")
    assert again == storage.join(root, "iter-00", aside.DISCARDED, "20250101T000000Z-2", "seed-train")
    assert aside.set_aside_under(storage.join(root, "iter-00")) == [moved, again]
    storage.write_text(storage.join(stage, contract.MANIFEST), "{}")  # replaced: every set-aside copy goes
    aside.forget_replaced(stage)
    assert aside.set_aside_under(storage.join(root, "iter-00")) == []
    assert storage.list_files(storage.join(root, "iter-00")) == [f"seed-train/{contract.MANIFEST}"]
