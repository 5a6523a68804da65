"""Shared fixtures: the tiny offline example, a moto S3 server on localhost, and a `spa-worker` runner."""

from __future__ import annotations

import os
import socket

import pytest
from workerproc import run_worker

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPA_HEARTBEAT_S", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny example: model (random Llama, BPE tokenizer), seed, prompts, heldout."""
    from spa_workers.tiny import make_tiny_example

    return make_tiny_example(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_policy(tiny, tmp_path_factory) -> str:
    """A second tiny model: the tiny model with perturbed weights, so policy != reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("policy"))
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto server) on localhost; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Environment pointing boto3 at the moto server, with a fresh bucket; yields the env dict."""
    import uuid

    import boto3
    from spa_workers import storage

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "SPA_S3_ENDPOINT": s3_server}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage.reset_client()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield {**env, "BUCKET": bucket}
    storage.reset_client()


@pytest.fixture()
def worker():
    """`worker("judge", "--policy", ...)` runs `spa-worker` as a subprocess."""
    return run_worker
