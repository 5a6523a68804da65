"""One small storage layer over `s3://bucket/key` and local paths (plain or `file://`).

S3 settings come from the environment, as boto3 reads them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL) plus SPA_S3_ENDPOINT, which wins when set. Writes of single
objects are atomic on both backends (S3 PUT; temp file + rename locally), so a reader never sees half a file.

Every byte of an object read or written through this layer is counted per process (`traffic`): a stage's ledger
takes its storage traffic from these counters. Listings, existence checks and ETags move no object bytes and are
not counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MULTIPART_THRESHOLD = 64 * 1024 * 1024
# Parallel transfers: a 7B model is ~15 GB in a few shards; one stream per file is far below a node's bandwidth.
TRANSFER_THREADS = 16  # concurrent ranged GETs / part uploads per file
FILE_THREADS = 4  # files of a directory fetched at once
COMPLETE = ".complete"  # marks a fetched copy as whole


class StorageError(Exception):
    """Storage is unreachable or refused an operation (not: an object is missing)."""


_traffic = {"read": 0, "written": 0}
_traffic_lock = threading.Lock()  # transfers of a directory run in threads
_counted_local_trees: set[str] = set()


def traffic() -> tuple[int, int]:
    """(bytes read, bytes written) through this layer by this process so far."""
    with _traffic_lock:
        return _traffic["read"], _traffic["written"]


def _count(read: int = 0, written: int = 0) -> None:
    with _traffic_lock:
        _traffic["read"] += read
        _traffic["written"] += written


def count_local_tree_read(path: str) -> None:
    """Count a local folder's files as read from storage, once per process: a model on a local path (or a shared
    volume) that a library loads from disk itself, not through this layer."""
    real = os.path.realpath(path)
    with _traffic_lock:
        if real in _counted_local_trees:
            return
        _counted_local_trees.add(real)
    _count(read=sum(p.stat().st_size for p in Path(real).rglob("*") if p.is_file()))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket in S3 URI")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


@functools.cache
def _client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("SPA_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                 s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def reset_client() -> None:
    """Forget the cached S3 client (after the environment changed)."""
    _client.cache_clear()


def _s3_call(fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return fn(*args, **kwargs)
    except ClientError:
        raise
    except NoCredentialsError as e:
        raise StorageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") \
            from e
    except BotoCoreError as e:  # connection refused, timeouts, bad endpoint
        raise StorageError(f"S3 unreachable: {type(e).__name__}: {e}") from e


def _is_missing(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            _s3_call(_client().head_object, Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _is_missing(e):
                return False
            raise StorageError(f"{uri}: {e.response['Error'].get('Code')}") from e
    return os.path.exists(_local(uri))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            data = _s3_call(_client().get_object, Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if _is_missing(e):
                raise FileNotFoundError(uri) from e
            raise StorageError(f"{uri}: {e.response['Error'].get('Code')}") from e
    else:
        data = Path(_local(uri)).read_bytes()
    _count(read=len(data))
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    _count(written=len(data))
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    path = Path(_local(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the mode an ordinary open() would
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@functools.cache
def _umask() -> int:
    """The process umask (reading it means setting it, so once, before any threads write)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD,
                          max_concurrency=TRANSFER_THREADS)


def upload_file(local_path: str, uri: str) -> None:
    """Copy a local file to `uri`; S3 uses parallel multipart above MULTIPART_THRESHOLD."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(_client().upload_file, local_path, bucket, key, Config=_transfer_config())
        _count(written=os.path.getsize(local_path))
        return
    dest = Path(_local(uri))
    if dest.resolve() == Path(local_path).resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dest)
    _count(written=os.path.getsize(dest))


def download_file(uri: str, local_path: str) -> None:
    """Copy `uri` to a local file; S3 objects above MULTIPART_THRESHOLD come as parallel ranged GETs."""
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        tmp = local_path + ".part"
        try:
            _s3_call(_client().download_file, bucket, key, tmp, Config=_transfer_config())
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):  # a failed transfer leaves no partial file behind
                os.unlink(tmp)
            if isinstance(e, ClientError) and _is_missing(e):
                raise FileNotFoundError(uri) from e
            raise
        os.replace(tmp, local_path)
    else:
        shutil.copyfile(_local(uri), local_path)
    _count(read=os.path.getsize(local_path))


def list_files(uri: str) -> list[str]:
    """Paths of all files below `uri`, relative to it, sorted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        paginator = _client().get_paginator("list_objects_v2")
        for page in _s3_call(lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix))):
            out += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        return sorted(out)
    root = Path(_local(uri))
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def list_dirs(uri: str) -> list[str]:
    """URIs of the immediate sub-directories of `uri`, sorted."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = _client().get_paginator("list_objects_v2")
        out = []
        for page in _s3_call(lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"))):
            out += [join(f"s3://{bucket}", cp["Prefix"]) for cp in page.get("CommonPrefixes", [])]
        return sorted(out)
    root = Path(_local(uri))
    if not root.is_dir():
        return []
    return sorted(join(uri, p.name) for p in root.iterdir() if p.is_dir())


def upload_dir(local_dir: str, uri: str) -> None:
    for rel in list_files(local_dir):
        upload_file(os.path.join(local_dir, rel), join(uri, rel))


def download_dir(uri: str, local_dir: str) -> None:
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(uri)
    with ThreadPoolExecutor(FILE_THREADS) as pool:  # boto3 clients are thread-safe
        for done in [pool.submit(download_file, join(uri, rel), os.path.join(local_dir, rel)) for rel in files]:
            done.result()


# A partial copy nobody has written to for this long belongs to a dead fetcher (a live one writes every few seconds).
STALE_PART_S = 600.0


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes where the filesystem has one (POSIX record lock: honoured on local disks
    and on NFS with a lock manager). The kernel drops it when its holder dies, so a killed downloader never blocks
    the others.

    Some ReadWriteMany volumes have none that works across nodes (NFS mounted `nolock` keeps locks local to each
    node, FUSE object-store mounts ignore them), and some refuse lockf outright (ENOLCK, EOPNOTSUPP): then this only
    saves duplicate downloads where it can, and `fetch_once` stays correct without it.
    """
    with open(path, "a") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX)
        except OSError:  # no lock here: proceed (fetch_once does not depend on it)
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)


def _last_write(path: str) -> float:
    """The newest modification time in a tree (a partial copy's last sign of life)."""
    newest = os.lstat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def fetch_once(dest: str, fetch: Callable[[str], None]) -> str:
    """`dest`, filled by `fetch(tmp_dir)` once however many processes ask at the same time, also across pods that
    share a ReadWriteMany cache whose locks do not work.

    Each fetcher writes into a folder of its own (`<dest>.part-<host>-<pid>-<random>`) and renames it into place
    (atomic); a fetcher that finds `dest` already there when it is done drops its copy. The lock only makes the
    others wait and reuse the first copy instead of fetching too. Partial copies are deleted only once nobody has
    written to them for STALE_PART_S (a dead fetcher's), never another live fetcher's.
    """
    if os.path.exists(os.path.join(dest, COMPLETE)):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with _file_lock(dest + ".lock"):
        if os.path.exists(os.path.join(dest, COMPLETE)):
            return dest
        parent, name = os.path.split(dest)
        for stale in os.listdir(parent):
            path = os.path.join(parent, stale)
            if stale.startswith(name + ".part"):
                with contextlib.suppress(OSError):
                    if time.time() - _last_write(path) > STALE_PART_S:
                        shutil.rmtree(path, ignore_errors=True)
        tmp = f"{dest}.part-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fetch(tmp)
            Path(tmp, COMPLETE).touch()
            _publish(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _publish(tmp: str, dest: str) -> None:
    """Rename a complete copy into place; if another fetcher's complete copy got there first, drop this one."""
    try:
        os.replace(tmp, dest)
        return
    except OSError:  # `dest` exists and is not empty
        pass
    if os.path.exists(os.path.join(dest, COMPLETE)):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # An incomplete `dest` (left by an older version, which fetched into it): nobody writes into it or reads it.
    # Moved aside first (atomic), so that a complete copy another fetcher renamed there meanwhile is not lost.
    aside = f"{dest}.part-old-{uuid.uuid4().hex[:8]}"
    os.replace(dest, aside)
    if os.path.exists(os.path.join(aside, COMPLETE)):
        aside, tmp = tmp, aside
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # (another fetcher may have published meanwhile: then that copy stays)
        os.replace(tmp, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def delete_tree(uri: str) -> None:
    """Delete the object or every object below `uri` (missing is fine)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        keys = [key] if exists(uri) else [f"{key.rstrip('/')}/{rel}" for rel in list_files(uri)]
        for i in range(0, len(keys), 1000):  # S3 deletes at most 1000 keys per request
            objects = [{"Key": k} for k in keys[i : i + 1000]]
            _s3_call(_client().delete_objects, Bucket=bucket, Delete={"Objects": objects})
        return
    path = Path(_local(uri))
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def move_tree(src: str, dest: str) -> int:
    """Move every file below `src` to the same place below `dest`; returns how many files moved (0: nothing there).

    Locally one rename (atomic). S3 has no move: every object is copied first (server-side, multipart above
    MULTIPART_THRESHOLD), and only once all copies exist are the sources deleted, markers (`_…` names such as
    `_SUCCESS.json`) in a first request, so a crash midway never leaves a source that still looks complete while
    missing files, nor loses an object: the worst case is the same files in both places.
    """
    if is_s3(src):
        files = list_files(src)
        bucket, key = split_s3(src)
        dest_bucket, dest_key = split_s3(dest)
        for rel in files:
            source = {"Bucket": bucket, "Key": f"{key.rstrip('/')}/{rel}"}
            _s3_call(_client().copy, source, dest_bucket, f"{dest_key.rstrip('/')}/{rel}",
                     Config=_transfer_config())
        markers = [rel for rel in files if os.path.basename(rel).startswith("_")]
        for group in (markers, [rel for rel in files if rel not in markers]):
            for i in range(0, len(group), 1000):  # S3 deletes at most 1000 keys per request
                objects = [{"Key": f"{key.rstrip('/')}/{rel}"} for rel in group[i : i + 1000]]
                _s3_call(_client().delete_objects, Bucket=bucket, Delete={"Objects": objects})
        return len(files)
    path, target = Path(_local(src)), Path(_local(dest))
    if not path.exists():
        return 0
    count = len(list_files(src)) if path.is_dir() else 1
    if target.exists():
        raise FileExistsError(f"{dest}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    return count


def etag(uri: str) -> str:
    """A version tag for an object or a directory tree (changes when its content changes)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if exists(uri):
            return _s3_call(_client().head_object, Bucket=bucket, Key=key)["ETag"].strip('"')
        h = hashlib.sha256()
        prefix = key.rstrip("/") + "/"
        paginator = _client().get_paginator("list_objects_v2")
        for page in _s3_call(lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix))):
            for obj in page.get("Contents", []):
                h.update(f"{obj['Key']}:{obj['ETag']}".encode())
        return h.hexdigest()[:32]
    path = Path(_local(uri))
    stats = [path.stat()] if path.is_file() else [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
    h = hashlib.sha256("".join(f"{s.st_size}:{s.st_mtime_ns};" for s in stats).encode())
    return h.hexdigest()[:32]


def local_path_for_reading(uri: str, cache_dir: str) -> str:
    """A local path holding the object at `uri` (downloaded into `cache_dir` for S3)."""
    if not is_s3(uri):
        return _local(uri)
    folder = os.path.join(cache_dir, hashlib.sha256(f"{uri}@{etag(uri)}".encode()).hexdigest()[:24])
    name = os.path.basename(uri)
    fetch_once(folder, lambda tmp: download_file(uri, os.path.join(tmp, name)))
    return os.path.join(folder, name)
