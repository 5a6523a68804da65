"""The operator's view of a run's storage: stage manifests and heartbeats, read; the finished run's PUBLISHED.json,
the one object it writes.

Each run may name its own S3 endpoint, region and credentials Secret, so the operator keeps one boto3 client per
(endpoint, region, credentials) instead of the workers' process-wide one. Local paths (dev clusters with a shared
volume) go through the workers' storage layer. Errors that mean "cannot tell" raise StorageError; a missing object is
an answer (None).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Protocol

from spa_workers import contract, storage
from spa_workers.contract import StageArgs, StageManifest
from spa_workers.storage import StorageError


class RunStore(Protocol):
    def manifests(self, args: StageArgs) -> list[StageManifest] | None: ...

    def progress(self, args: StageArgs) -> float | None: ...

    def write_text(self, uri: str, text: str) -> None: ...


class S3RunStore:
    def __init__(self, client: Any) -> None:
        self.client = client

    def _get(self, uri: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"S3 refused the request: {code or 'error'}") from None
        except BotoCoreError as e:
            raise StorageError(f"S3 unreachable: {type(e).__name__}") from None

    def _read(self, uri: str) -> bytes | None:
        return self._get(uri) if storage.is_s3(uri) else _read_local(uri)

    def write_text(self, uri: str, text: str) -> None:
        if not storage.is_s3(uri):
            storage.write_text(uri, text)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = storage.split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=text.encode())
        except ClientError as e:
            raise StorageError(f"S3 refused the request: {e.response.get('Error', {}).get('Code', 'error')}") from None
        except BotoCoreError as e:
            raise StorageError(f"S3 unreachable: {type(e).__name__}") from None

    def manifests(self, args: StageArgs) -> list[StageManifest] | None:
        out = []
        for d in contract.stage_manifest_dirs(args):
            raw = self._read(storage.join(d, contract.MANIFEST))
            if raw is None:
                return None
            out.append(StageManifest.from_json(raw.decode()))
        return out

    def progress(self, args: StageArgs) -> float | None:
        """Mean fraction done over the stage's shards (a shard with a manifest counts as 1)."""
        fractions = []
        for d in contract.stage_manifest_dirs(args):
            if self._read(storage.join(d, contract.MANIFEST)) is not None:
                fractions.append(1.0)
                continue
            raw = self._read(storage.join(d, contract.PROGRESS))
            try:
                fractions.append(float(json.loads(raw)["fraction"]) if raw else 0.0)
            except (ValueError, KeyError, TypeError):
                fractions.append(0.0)
        return sum(fractions) / len(fractions) if fractions else None


def _read_local(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"{uri}: {e.strerror}") from None


class ClientCache:
    """boto3 clients (~12 MiB each), one per (endpoint, region, credentials Secret): a rotated credential replaces the
    Secret's client instead of adding one, and the least recently used client goes past `limit`. Credentials never
    appear in keys (only a hash, to notice a rotation)."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._clients: OrderedDict[tuple[str | None, str | None, str | None], tuple[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def store(self, endpoint: str | None, region: str | None, creds: dict[str, str] | None,
              secret_name: str | None = None) -> S3RunStore:
        digest = hashlib.sha256(json.dumps(creds or {}, sort_keys=True).encode()).hexdigest()
        key = (endpoint, region, secret_name)
        with self._lock:
            held = self._clients.get(key)
            if held is None or held[0] != digest:
                held = self._clients[key] = (digest, _make_client(endpoint, region, creds))
            self._clients.move_to_end(key)
            while len(self._clients) > self.limit:
                self._clients.popitem(last=False)
        return S3RunStore(held[1])

    def __len__(self) -> int:
        return len(self._clients)

    def forget(self) -> None:
        with self._lock:
            self._clients.clear()


def _make_client(endpoint: str | None, region: str | None, creds: dict[str, str] | None) -> Any:
    import boto3
    from botocore.config import Config

    # Short timeouts and few retries: an unreachable store becomes a status condition quickly, and the
    # reconcile loop (not boto) retries.
    cfg = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10,
                 s3={"addressing_style": "path"})
    kwargs: dict[str, Any] = {"endpoint_url": endpoint, "config": cfg, "region_name": region}
    if creds and creds.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
                      aws_session_token=creds.get("AWS_SESSION_TOKEN"))
    return boto3.session.Session().client("s3", **kwargs)
