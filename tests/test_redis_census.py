"""Redis stays bounded: after a small realistic load on real parts (a private redis-server, a real
mlx worker, a `genq gateway` with two tenants' API keys), every key of the namespace either expires
or is a structure with a named bound. A key that fits neither is state that grows for ever.

The load: plain and streamed completions, a repeated request with an Idempotency-Key, genq's job
endpoints (submit, status, result, cancel), a file upload, a batch, and a job that crashes its
server every time and ends in dead letters."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract import protocol
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.protocol.index import IndexAdd
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, batch_line, start_gateway, wait_for, write_jsonl
from tests.faults import POISON_MARKER, POISON_SITE
from tests.harness import WorkerHandle, start_worker
from tests.security_helpers import as_caller, tenant_keys_env

ALICE = f"sk-alice-{uuid.uuid4().hex}"
BOB = f"sk-bob-{uuid.uuid4().hex}"
KEY_ENTRIES: list[dict[str, Any]] = [{"key": ALICE, "name": "alice"}, {"key": BOB, "name": "bob"}]

# Keys without a TTL that are allowed, each with the bound that keeps it small. The pattern is matched
# against the key with the namespace prefix removed.
BOUNDED: dict[str, str] = {
    r"q:[^:]+\.(interactive|batch)": "a queue's stream: submit refuses past GENQ_MAX_QUEUED_JOBS entries, "
    "and an entry is deleted once settled",
    r"q:[^:]+\.(interactive|batch)\.DQ": "a delay queue: at most one entry per admitted job waiting to retry, "
    "deleted when due",
    r"q:[^:]+\.(interactive|batch)(\.DQ)?:part:[A-Za-z0-9._-]+(#[0-9]+)?": "a partition of a queue (a tenant's, "
    "or a tenant's prefix shard): submit refuses past GENQ_MAX_QUEUED_JOBS entries per tenant of a queue, an entry "
    "is deleted once settled; configured tenants x (PREFIX_SHARDS + 1) per queue",
    r"q:[^:]+\.(interactive|batch)(\.DQ)?:partitions": "a queue's partition set: configured tenants x "
    "(PREFIX_SHARDS + 1) members at most",
    r"q:[^:]+\.(interactive|batch)(\.DQ)?:fair": "a queue's fair-share account: one field per configured tenant",
    r"q:[^:]+\.(interactive|batch)(\.DQ)?:bell": "a queue's bell, rung once per partition made: XADD MAXLEN ~ 64",
    r"tenant_shares": "the tenants' shares: one field per configured tenant, rewritten when a gateway starts",
    r"placement": "the workers' published models: one field per live worker process; fields whose worker "
    "stopped renewing are dropped on every publish",
    r"placement:until": "when each worker's placement record lapses: one member per live worker process, "
    "pruned on every publish",
    r"queues": "the set of queue names: the routes' models x backends x lanes",
    r"pool:[^:]+": "a pool's workers: entries past their vouch are pruned on every vouch",
    r"dead": "dead letters: XADD MAXLEN ~ GENQ_DEAD_LETTERS_MAX (and MINID by GENQ_DEAD_LETTERS_MAX_AGE_S)",
    r"batches:active": "unfinished gateway batches (each under its key's batch bound); ids whose record is "
    "gone are dropped on every adoption round",
}


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as local:
        yield local


@pytest.fixture(scope="module")
def settings(server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=server.url, namespace=f"n{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("census")


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, log_dir: Path) -> Iterator[WorkerHandle]:
    poison = os.pathsep.join(p for p in (str(POISON_SITE), os.environ.get("PYTHONPATH", "")) if p)
    handle = start_worker(settings, log_dir, concurrency=8, env={"PYTHONPATH": poison})
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def gateway(settings: GenqSettings, log_dir: Path) -> Iterator[Gateway]:
    handle = start_gateway(settings, log_dir, **tenant_keys_env(KEY_ENTRIES))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


def call(gateway: Gateway, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return httpx.request(method, gateway.url + path, headers=headers, timeout=180, **kwargs)


def load(gateway: Gateway, db: redis.Redis, keys: Keys, tmp_path: Path) -> None:
    ask = {"model": "tiny", "prompt": "census", "max_tokens": 8, "temperature": 0}
    for key in (ALICE, BOB):
        sdk = as_caller(gateway, key)
        assert sdk.completions.create(**ask).choices[0].text is not None
        chunks = sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
        assert len(list(chunks)) > 0
        for _ in range(2):
            again = call(gateway, key, "POST", "/v1/completions", json=ask, headers={"Idempotency-Key": "census-1"})
            assert again.status_code == 200, again.text
        job_id = call(gateway, key, "POST", "/v1/genq/jobs", json=ask).json()["job_id"]
        assert call(gateway, key, "GET", f"/v1/genq/jobs/{job_id}").status_code == 200
        done = call(gateway, key, "GET", f"/v1/genq/jobs/{job_id}/result", params={"wait": 120})
        assert done.status_code == 200, done.text
    long_job = call(gateway, ALICE, "POST", "/v1/genq/jobs", json={**ask, "max_tokens": 4000}).json()["job_id"]
    assert call(gateway, ALICE, "POST", f"/v1/genq/jobs/{long_job}/cancel").status_code == 200

    alice = as_caller(gateway, ALICE)
    lines = [batch_line(f"r{i}", max_tokens=8) for i in range(3)]
    file_id = alice.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch").id
    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: alice.batches.retrieve(batch.id).status == "completed", 180)

    dead_before = db.xlen(keys.dead_letters)
    poison = {**ask, "prompt": f"please {POISON_MARKER} now"}
    call(gateway, BOB, "POST", "/v1/genq/jobs", json=poison).raise_for_status()
    wait_for(lambda: db.xlen(keys.dead_letters) > dead_before, 300, interval=1)


def test_an_index_write_prunes_ids_whose_object_is_gone_and_renews_the_index_ttl(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Not only when listed: a tenant that uploads and never lists must not grow its index."""
    index = keys.tenant_files("t")
    redis_client.zadd(index, {f"file-gone-{n}": n for n in range(40)})
    redis_client.set(keys.file("file-live"), "x")
    redis_client.zadd(index, {"file-live": 0})
    redis_client.set(keys.file_content("file-uploading"), "")  # reserved: content only, no hash yet
    redis_client.zadd(index, {"file-uploading": 0})
    redis_client.set(keys.file("file-new"), "x")
    for _ in range(3):
        protocol.run(redis_client, IndexAdd([index], [100], "file-new", 60, keys.file(""), ":content"))
    left = {m.decode() for m in redis_client.zrange(index, 0, -1)}
    assert left == {"file-live", "file-uploading", "file-new"}
    assert 0 < redis_client.ttl(index) <= 60


def test_every_key_expires_or_has_a_named_bound(
    worker: WorkerHandle, gateway: Gateway, db: redis.Redis, settings: GenqSettings, tmp_path: Path
) -> None:
    keys = Keys(settings.namespace)
    load(gateway, db, keys, tmp_path)
    prefix = f"{settings.namespace}:"
    unbounded, seen = [], 0
    for raw in db.scan_iter(match=f"{prefix}*", count=1000):
        seen += 1
        name = raw.decode()
        if db.ttl(raw) > 0:
            continue
        rest = name.removeprefix(prefix)
        if any(re.fullmatch(pattern, rest) for pattern in BOUNDED):
            continue
        if db.exists(raw):  # not expired between SCAN and TTL
            unbounded.append(f"{name} ({db.type(raw).decode()})")
    assert seen > 20, f"the load left only {seen} keys: it did not run"
    assert not unbounded, "keys with neither a TTL nor a named bound:\n" + "\n".join(sorted(unbounded))
