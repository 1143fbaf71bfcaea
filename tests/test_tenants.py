"""Tenants on one shared gateway, on real parts: a private redis-server, a real mlx worker, `genq
gateway` subprocesses with API keys, the unmodified `openai` SDK where it has the call, httpx where
it has not.

Covers: each tenant sees only its own files, batches and jobs (list, retrieve, content, cancel,
delete, status, result), another tenant's object answers exactly as an id that does not exist; two
keys of one tenant share their work; an admin key sees all; idempotency keys are per tenant and a
reused key with another body is refused; a hung-up idempotent stream is not poisoned; per-tenant
bounds on files; a failed upload leaves nothing behind; a batch's input file cannot vanish under it,
and a batch whose input does vanish fails instead of completing short."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, batch_line, start_gateway, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker
from tests.security_helpers import as_caller, assert_hidden, tenant_keys_env

ALICE = f"sk-alice-{uuid.uuid4().hex}"
ALICE_CRON = f"sk-alice-cron-{uuid.uuid4().hex}"  # a second key of tenant "alice"
BOB = f"sk-bob-{uuid.uuid4().hex}"
CAROL = f"sk-carol-{uuid.uuid4().hex}"
OPS = f"sk-ops-{uuid.uuid4().hex}"  # admin
SMALL = f"sk-small-{uuid.uuid4().hex}"  # tight file bounds
SMALL_UPLOAD, SMALL_TOTAL, SMALL_FILES = 4000, 6000, 2
KEY_ENTRIES: list[dict[str, Any]] = [
    {"key": ALICE, "name": "alice"},
    {"key": ALICE_CRON, "name": "alice-cron", "tenant": "alice"},
    {"key": BOB, "name": "bob"},
    {"key": CAROL, "name": "carol"},
    {"key": OPS, "name": "ops", "admin": True},
    {
        "key": SMALL,
        "name": "small",
        "max_files": SMALL_FILES,
        "max_file_bytes": SMALL_TOTAL,
        "max_upload_bytes": SMALL_UPLOAD,
    },
]
MISSING_FILE = "file-" + "0" * 32
MISSING_BATCH = "batch_" + "0" * 32
MISSING_JOB = "0" * 32


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as local:
        yield local


@pytest.fixture(scope="module")
def settings(server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=server.url, namespace=f"n{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, log_dir: Path) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, log_dir, concurrency=8)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gateway(settings: GenqSettings, log_dir: Path) -> Iterator[Gateway]:
    handle = start_gateway(settings, log_dir, **tenant_keys_env(KEY_ENTRIES))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(gateway: Gateway, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, gateway.url + path, headers={**auth(key), **kwargs.pop("headers", {})}, timeout=60, **kwargs
    )


def upload(gateway: Gateway, key: str, path: Path) -> str:
    return as_caller(gateway, key).files.create(file=path.open("rb"), purpose="batch").id


def test_files_stay_with_their_tenant(gateway: Gateway, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "alice.jsonl", [batch_line("a0")])
    mine = upload(gateway, ALICE, path)
    bobs = upload(gateway, BOB, write_jsonl(tmp_path / "bob.jsonl", [batch_line("b0")]))
    for key in (BOB, CAROL):
        sdk = as_caller(gateway, key)
        assert mine not in [f.id for f in sdk.files.list().data]
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            foreign = call(gateway, key, method, f"/v1/files/{mine}{suffix}")
            missing = call(gateway, key, method, f"/v1/files/{MISSING_FILE}{suffix}")
            assert_hidden(foreign, missing, mine, MISSING_FILE)
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(mine)
        with pytest.raises(openai.NotFoundError):
            sdk.files.content(mine)
        with pytest.raises(openai.NotFoundError):
            sdk.files.delete(mine)
    assert [f.id for f in as_caller(gateway, BOB).files.list().data] == [bobs]
    # Still there for its tenant, through either of its keys; the admin sees every tenant's files.
    for key in (ALICE, ALICE_CRON, OPS):
        sdk = as_caller(gateway, key)
        assert sdk.files.retrieve(mine).bytes == path.stat().st_size
        assert sdk.files.content(mine).text == path.read_text()
    assert mine in [f.id for f in as_caller(gateway, ALICE_CRON).files.list().data]
    assert bobs not in [f.id for f in as_caller(gateway, ALICE).files.list().data]
    assert {mine, bobs} <= {f.id for f in as_caller(gateway, OPS).files.list().data}
    assert as_caller(gateway, ALICE_CRON).files.delete(mine).deleted
    with pytest.raises(openai.NotFoundError):
        as_caller(gateway, ALICE).files.retrieve(mine)


def test_batches_stay_with_their_tenant(
    worker: WorkerHandle, gateway: Gateway, db: redis.Redis, settings: GenqSettings, tmp_path: Path
) -> None:
    alice = as_caller(gateway, ALICE)
    file_id = upload(
        gateway, ALICE, write_jsonl(tmp_path / "in.jsonl", [batch_line(f"r{i}", max_tokens=3000) for i in range(3)])
    )
    # Another tenant cannot even start a batch on it: its input reads as a file that does not exist.
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    foreign = call(gateway, BOB, "POST", "/v1/batches", json=body)
    missing = call(gateway, BOB, "POST", "/v1/batches", json={**body, "input_file_id": MISSING_FILE})
    assert_hidden(foreign, missing, file_id, MISSING_FILE)

    batch = alice.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: alice.batches.retrieve(batch.id).status == "in_progress", 60)
    for key in (BOB, CAROL):
        sdk = as_caller(gateway, key)
        assert batch.id not in [b.id for b in sdk.batches.list().data]
        for method, suffix in (("GET", ""), ("POST", "/cancel")):
            foreign = call(gateway, key, method, f"/v1/batches/{batch.id}{suffix}")
            missing = call(gateway, key, method, f"/v1/batches/{MISSING_BATCH}{suffix}")
            assert_hidden(foreign, missing, batch.id, MISSING_BATCH)
        with pytest.raises(openai.NotFoundError):
            sdk.batches.cancel(batch.id)
    assert alice.batches.retrieve(batch.id).status == "in_progress", "another tenant cancelled the batch"
    assert batch.id in [b.id for b in as_caller(gateway, ALICE_CRON).batches.list().data]
    assert batch.id in [b.id for b in as_caller(gateway, OPS).batches.list().data]
    assert as_caller(gateway, OPS).batches.retrieve(batch.id).input_file_id == file_id

    # Its jobs are the tenant's too (their ids are in the output lines): readable by it, hidden from others.
    job_id = wait_for(lambda: db.hkeys(Keys(settings.namespace).batch_jobs(batch.id)), 30)[0].decode()
    assert call(gateway, ALICE, "GET", f"/v1/genq/jobs/{job_id}").status_code == 200
    assert_hidden(
        call(gateway, BOB, "GET", f"/v1/genq/jobs/{job_id}"),
        call(gateway, BOB, "GET", f"/v1/genq/jobs/{MISSING_JOB}"),
        job_id,
        MISSING_JOB,
    )

    # A second key of the tenant cancels it; its output and error files are the tenant's.
    as_caller(gateway, ALICE_CRON).batches.cancel(batch.id)
    done = wait_for(lambda: (b := alice.batches.retrieve(batch.id)).status == "cancelled" and b, 60)
    assert done.error_file_id is not None
    assert alice.files.retrieve(done.error_file_id).purpose == "batch_output"
    for key in (BOB, CAROL):
        assert_hidden(
            call(gateway, key, "GET", f"/v1/files/{done.error_file_id}/content"),
            call(gateway, key, "GET", f"/v1/files/{MISSING_FILE}/content"),
            done.error_file_id,
            MISSING_FILE,
        )
        assert done.error_file_id not in [f.id for f in as_caller(gateway, key).files.list().data]


def test_jobs_stay_with_their_tenant(
    worker: WorkerHandle, gateway: Gateway, db: redis.Redis, settings: GenqSettings
) -> None:
    ask = {"model": "tiny", "prompt": "a long story", "max_tokens": 4000, "temperature": 0}
    job_id = call(gateway, ALICE, "POST", "/v1/genq/jobs", json=ask).json()["job_id"]
    for key in (BOB, CAROL):
        for method, suffix in (("GET", ""), ("GET", "/result"), ("POST", "/cancel")):
            foreign = call(gateway, key, method, f"/v1/genq/jobs/{job_id}{suffix}")
            missing = call(gateway, key, method, f"/v1/genq/jobs/{MISSING_JOB}{suffix}")
            assert_hidden(foreign, missing, job_id, MISSING_JOB)
        waited = call(gateway, key, "GET", f"/v1/genq/jobs/{job_id}/result", params={"wait": 1})
        assert waited.status_code == 404
    state = db.hget(Keys(settings.namespace).job(job_id), "state")
    assert state in (b"queued", b"running"), "another tenant cancelled the job"
    for key in (ALICE_CRON, OPS):
        assert call(gateway, key, "GET", f"/v1/genq/jobs/{job_id}").json()["state"] in ("queued", "running")
    assert call(gateway, ALICE_CRON, "POST", f"/v1/genq/jobs/{job_id}/cancel").status_code == 200
    final = call(gateway, ALICE, "GET", f"/v1/genq/jobs/{job_id}/result", params={"wait": 30})
    assert final.json()["state"] == "cancelled"


def test_idempotency_keys_belong_to_a_tenant(worker: WorkerHandle, gateway: Gateway) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = {"model": "tiny", "prompt": "same words", "max_tokens": 8, "temperature": 0}
    ids = {}
    for caller in (ALICE, BOB, CAROL, ALICE_CRON):
        response = call(gateway, caller, "POST", "/v1/genq/jobs", json=body, headers={"Idempotency-Key": key})
        assert response.status_code == 202, response.text
        ids[caller] = response.json()["job_id"]
    # Same key, three tenants: three jobs; the second key of alice gets alice's job back.
    assert len({ids[ALICE], ids[BOB], ids[CAROL]}) == 3
    assert ids[ALICE_CRON] == ids[ALICE]
    assert call(gateway, BOB, "GET", f"/v1/genq/jobs/{ids[BOB]}").status_code == 200
    assert call(gateway, BOB, "GET", f"/v1/genq/jobs/{ids[ALICE]}").status_code == 404

    # The same key with another body is refused (OpenAI, Stripe), and queues nothing.
    other = {**body, "prompt": "other words"}
    refused = call(gateway, ALICE, "POST", "/v1/genq/jobs", json=other, headers={"Idempotency-Key": key})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "idempotency_key_reused"
    sdk = as_caller(gateway, ALICE)
    with pytest.raises(openai.ConflictError):
        sdk.completions.create(model="tiny", prompt="other words", max_tokens=8, extra_headers={"Idempotency-Key": key})


def test_a_hung_up_idempotent_stream_runs_on_and_its_retry_gets_the_whole_output(
    worker: WorkerHandle, gateway: Gateway, db: redis.Redis, settings: GenqSettings
) -> None:
    key = f"stream-{uuid.uuid4().hex}"
    body = {"model": "tiny", "prompt": "tell it all", "max_tokens": 200, "temperature": 0, "stream": True}
    headers = {**auth(ALICE), "Idempotency-Key": key}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=60) as first:
        job_id = first.headers["x-genq-job-id"]
        assert next(line for line in first.iter_lines() if line.startswith("data: "))
    # The hang-up did not cancel it: it runs to its end, and the key is not poisoned.
    record = Keys(settings.namespace).job(job_id)
    state = wait_for(lambda: (s := db.hget(record, "state")) in (b"succeeded", b"failed", b"cancelled") and s, 60)
    assert state == b"succeeded"
    whole = call(gateway, ALICE, "GET", f"/v1/genq/jobs/{job_id}/result").json()["text"]

    sdk = as_caller(gateway, ALICE)
    retry = sdk.completions.create(
        model="tiny",
        prompt="tell it all",
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_headers={"Idempotency-Key": key},
    )
    chunks = list(retry)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert {c.id for c in chunks} == {chunks[0].id} and job_id in chunks[0].id

    # A stream without a key still frees the worker when its caller hangs up.
    plain = {**body, "max_tokens": 4000}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=plain, headers=auth(ALICE), timeout=60) as gone:
        gone_id = gone.headers["x-genq-job-id"]
        assert next(line for line in gone.iter_lines() if line.startswith("data: "))
    key_of = Keys(settings.namespace).job(gone_id)
    assert wait_for(lambda: (s := db.hget(key_of, "state")) in (b"succeeded", b"cancelled") and s, 30) == b"cancelled"

    # A retry whose job was cancelled gets a clear error, never a partial replay that ends "cancelled".
    key2 = f"stream-{uuid.uuid4().hex}"
    long = {**body, "max_tokens": 4000}
    headers2 = {**auth(ALICE), "Idempotency-Key": key2}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=long, headers=headers2, timeout=60) as third:
        cancelled_id = third.headers["x-genq-job-id"]
        assert next(line for line in third.iter_lines() if line.startswith("data: "))
        assert call(gateway, ALICE, "POST", f"/v1/genq/jobs/{cancelled_id}/cancel").status_code == 200
    wait_for(lambda: db.hget(Keys(settings.namespace).job(cancelled_id), "state") == b"cancelled", 30)
    replay = httpx.post(f"{gateway.url}/v1/completions", json=long, headers=headers2, timeout=60)
    assert replay.status_code == 409, replay.text
    message = replay.json()["error"]["message"]
    assert "cancelled" in message and "new Idempotency-Key" in message, message


def test_per_tenant_file_bounds(gateway: Gateway, db: redis.Redis, settings: GenqSettings, tmp_path: Path) -> None:
    sdk = as_caller(gateway, SMALL)
    keys = Keys(settings.namespace)
    before = set(db.scan_iter(f"{keys.namespace}:file:*"))
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (SMALL_UPLOAD + 1))
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.files.create(file=big.open("rb"), purpose="batch")
    assert caught.value.status_code == 413
    assert f"over the limit of {SMALL_UPLOAD} bytes for one upload" in caught.value.message
    three_k = tmp_path / "3k.jsonl"
    three_k.write_bytes(b"y" * 3000)
    first = sdk.files.create(file=three_k.open("rb"), purpose="batch")
    over = tmp_path / "3k1.jsonl"
    over.write_bytes(b"z" * 3001)
    with pytest.raises(openai.RateLimitError, match=f"files hold 3000 of its {SMALL_TOTAL} bytes"):
        sdk.files.create(file=over.open("rb"), purpose="batch")
    second = sdk.files.create(file=three_k.open("rb"), purpose="batch")  # 6,000 of 6,000 bytes: fits
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_bytes(b"t")
    with pytest.raises(openai.RateLimitError, match=f"has {SMALL_FILES} files, its limit"):
        sdk.files.create(file=tiny.open("rb"), purpose="batch")
    # Refusals left nothing in Redis; deleting a file makes room.
    assert set(db.scan_iter(f"{keys.namespace}:file:*")) - before == {
        keys.file(first.id).encode(),
        keys.file_content(first.id).encode(),
        keys.file(second.id).encode(),
        keys.file_content(second.id).encode(),
    }
    sdk.files.delete(first.id)
    assert sdk.files.create(file=tiny.open("rb"), purpose="batch").bytes == 1
    # Other tenants are not bound by this one's use.
    assert as_caller(gateway, CAROL).files.create(file=over.open("rb"), purpose="batch").bytes == 3001


def test_a_failed_upload_leaves_nothing_behind(models_dir: Path, tmp_path: Path) -> None:
    """Redis refuses writes half way through (out of memory): no piece of the file stays, and the
    tenant's byte count is given back."""
    with LocalRedis() as local:
        settings = GenqSettings(redis_url=local.url, namespace=f"u{uuid.uuid4().hex[:8]}", models_dir=models_dir)
        gateway = start_gateway(settings, tmp_path, **tenant_keys_env(KEY_ENTRIES))
        admin = redis.Redis(port=local.port)
        try:
            sdk = as_caller(gateway, CAROL)
            path = tmp_path / "big.jsonl"
            path.write_bytes(b"x" * (6 << 20))
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used + (3 << 20))
            with pytest.raises(openai.APIStatusError) as caught:
                sdk.files.create(file=path.open("rb"), purpose="batch")
            assert caught.value.status_code == 503 and "out of memory" in caught.value.message
            admin.config_set("maxmemory", 0)
            assert [k for k in admin.scan_iter(f"{settings.namespace}:*") if b":file" in k] == []
            small = tmp_path / "small.jsonl"
            small.write_bytes(b"ok\n")
            kept = sdk.files.create(file=small.open("rb"), purpose="batch")
            assert [f.id for f in sdk.files.list().data] == [kept.id]
            ttl = admin.ttl(Keys(settings.namespace).file_content(kept.id))
            assert 0 < ttl <= settings.result_ttl_s
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
            gateway.stop()


# -- a batch's input file (issue #10, item 4) ------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_gateway(settings: GenqSettings, log_dir: Path) -> Iterator[Gateway]:
    """Without keys: the default tenant, as a loopback deployment runs."""
    handle = start_gateway(settings, log_dir)
    yield handle
    handle.stop()


def test_a_batch_whose_input_vanishes_fails_and_never_completes_short(
    worker: WorkerHandle, plain_gateway: Gateway, db: redis.Redis, settings: GenqSettings, tmp_path: Path
) -> None:
    """More lines than a batch keeps in flight (1,000) and over 1 MiB, so the runner reads the end of
    the file only after its first jobs finished: the file expiring then (deleted here under the
    gateway, as Redis's TTL would) must fail the batch, not end it `completed` with lines missing."""
    total = 1300
    pad = {f"p{i}": "x" * 500 for i in range(5)}  # ~2.5 kB a line: the file spans 4 reads of 1 MiB
    lines = [batch_line(f"r{i}", max_tokens=1, metadata=pad) for i in range(total)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert path.stat().st_size > 3 << 20
    sdk = as_caller(plain_gateway, "x")
    file_id = upload(plain_gateway, "x", path)
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    keys = Keys(settings.namespace)
    wait_for(lambda: int(db.hget(keys.batch(batch.id), "submitted") or 0) > 0, 120)
    db.delete(keys.file(file_id), keys.file_content(file_id))
    final = wait_for(
        lambda: (b := sdk.batches.retrieve(batch.id)).status in ("completed", "failed", "cancelled") and b, 300
    )
    counts = final.request_counts
    assert final.status == "failed", (final.status, counts)
    assert final.errors is not None and final.errors.data
    message = final.errors.data[0].message or ""
    assert final.errors.data[0].code == "input_file_missing" and file_id in message, message
    assert "not valid JSON" not in json.dumps(final.model_dump())


def test_a_file_in_use_by_a_batch_cannot_be_deleted_and_stays_alive_while_it_runs(
    worker: WorkerHandle, plain_gateway: Gateway, db: redis.Redis, settings: GenqSettings, tmp_path: Path
) -> None:
    sdk = as_caller(plain_gateway, "x")
    keys = Keys(settings.namespace)
    # Long enough to still run when its TTL is checked, on a fast machine too (two lines finished in
    # under 30 s here, and a finished batch renews nothing); it is cancelled below.
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"r{i}", max_tokens=3000) for i in range(200)])
    file_id = upload(plain_gateway, "x", path)
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: sdk.batches.retrieve(batch.id).status == "in_progress", 60)
    refused = httpx.delete(f"{plain_gateway.url}/v1/files/{file_id}", timeout=10)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "file_in_use" and batch.id in error["message"]
    with pytest.raises(openai.ConflictError):
        sdk.files.delete(file_id)
    assert sdk.files.content(file_id).text == path.read_text()
    # About to expire: the running batch keeps it alive.
    for key in (keys.file(file_id), keys.file_content(file_id)):
        db.expire(key, 30)
    # Renewed every 10 s while the batch runs; a loaded machine (the whole suite on 2 cores) has made
    # the gateway's batch thread late by more than 20 s, so the wait is generous.
    wait_for(lambda: all(db.ttl(k) > 60 for k in (keys.file(file_id), keys.file_content(file_id))), 90)
    sdk.batches.cancel(batch.id)
    wait_for(lambda: sdk.batches.retrieve(batch.id).status == "cancelled", 60)
    assert sdk.files.delete(file_id).deleted
    assert Counter(db.exists(k) for k in (keys.file(file_id), keys.file_content(file_id))) == Counter({0: 2})
