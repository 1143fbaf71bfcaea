"""The HTTP gateway on real parts: `genq gateway` as a subprocess on a free port, a real mlx worker on
the tiny model, a private redis-server, and the unmodified `openai` SDK as the caller."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect
from jobcontract.keys import Keys
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, batch_line, job_keys, job_starts, start_gateway, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker


@pytest.fixture(scope="module")
def settings(redis_server: LocalRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=redis_server.url, namespace=f"g{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, tmp_path_factory.mktemp("gateway-worker"), concurrency=4)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gateway(settings: GenqSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    handle = start_gateway(settings, tmp_path_factory.mktemp("gateway"))
    yield handle
    handle.stop()


@pytest.fixture
def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed-on-loopback", max_retries=0)


@pytest.fixture
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


def test_openai_sdk_completions_and_chat(worker: WorkerHandle, sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == "tiny"
    assert completion.choices[0].text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 12
    again = sdk.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert again.choices[0].text == completion.choices[0].text  # greedy, through the queue twice
    assert again.id != completion.id

    chat = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_completion_tokens=10,
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.prompt_tokens > 0

    models = sdk.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_openai_sdk_streams_tokens_as_they_come(worker: WorkerHandle, sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me"}], max_tokens=24, temperature=0
    )
    stream = sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer came in one piece, not as a stream"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert whole.usage is not None and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text_stream = sdk.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0, stream=True)
    texts = [c.choices[0].text for c in text_stream]
    assert (
        "".join(texts)
        == sdk.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0).choices[0].text
    )


def test_a_caller_who_hangs_up_on_a_stream_cancels_the_job(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    body = {"model": "tiny", "prompt": "go on forever", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=30) as response:
        job_id = response.headers["x-genq-job-id"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    key = Keys(settings.namespace).job(job_id)
    state = wait_for(lambda: (value := db.hget(key, "state")) in (b"cancelled", b"succeeded", b"failed") and value, 30)
    assert state == b"cancelled"


def test_an_openai_batch_through_files_and_batches(worker: WorkerHandle, sdk: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"q{i}", chat=True) for i in range(15)])
    upload = sdk.files.create(file=path.open("rb"), purpose="batch")
    assert upload.bytes == path.stat().st_size and upload.purpose == "batch"
    assert sdk.files.retrieve(upload.id).filename == "in.jsonl"
    created = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "t"}
    )
    assert created.status in ("validating", "in_progress") and created.metadata == {"run": "t"}
    batch = wait_for(
        lambda: (b := sdk.batches.retrieve(created.id)).status in ("completed", "failed", "cancelled") and b, 120
    )
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (15, 15, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    assert batch.output_file_id is not None
    lines = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
    assert Counter(line["custom_id"] for line in lines) == Counter(f"q{i}" for i in range(15))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in lines)
    assert created.id in [b.id for b in sdk.batches.list(limit=10).data]


def test_a_batch_with_invalid_lines_fails_validation_and_queues_nothing(
    worker: WorkerHandle, sdk: openai.OpenAI, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.namespace)
    before = job_keys(db, keys)
    path = write_jsonl(
        tmp_path / "in.jsonl", [batch_line("a"), batch_line("b", chat=True), "nope", batch_line("c", top_k=3)]
    )
    upload = sdk.files.create(file=path.open("rb"), purpose="batch")
    created = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    batch = wait_for(lambda: (b := sdk.batches.retrieve(created.id)).status == "failed" and b, 30)
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_request"),
        (3, "invalid_request"),
        (4, "invalid_request"),
    ]
    assert "unsupported parameter 'top_k'" in (batch.errors.data[2].message or "")
    assert job_keys(db, keys) == before


def test_malformed_http_bodies_get_clear_4xx_and_queue_nothing(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    keys = Keys(settings.namespace)
    before = job_keys(db, keys)
    url = gateway.url
    cases: list[tuple[str, dict[str, object] | str, int, str]] = [
        ("/v1/completions", "{not json", 400, "not valid JSON"),
        ("/v1/completions", {"model": "tiny"}, 400, "missing required parameter 'prompt'"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "unsupported parameter 'logprobs'"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, 400, "n"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**6}, 400, "cap"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "gpt-17", "prompt": "x"}, 404, "does not exist"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ("/v1/genq/jobs", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
        (
            "/v1/genq/jobs",
            {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            400,
            "exactly one",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x" * 5_000_000}, 413, "over the limit"),
    ]
    for path, body, status, words in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        response = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == status, (path, body if isinstance(body, str) else list(body), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert words in error["message"], (words, error)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(model="nope", prompt="x")
    assert job_keys(db, keys) == before


def test_genq_job_endpoints_submit_status_result_cancel_and_idempotency(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    url = gateway.url
    submitted = httpx.post(f"{url}/v1/genq/jobs", json={"model": "tiny", "prompt": "hi", "max_tokens": 8}, timeout=10)
    assert submitted.status_code == 202
    job_id = submitted.json()["job_id"]
    result = httpx.get(f"{url}/v1/genq/jobs/{job_id}/result", params={"wait": 60}, timeout=70)
    assert result.status_code == 200 and result.json()["state"] == "succeeded" and result.json()["text"]
    status = httpx.get(f"{url}/v1/genq/jobs/{job_id}", timeout=10).json()
    assert status["state"] == "succeeded" and status["lane"] == "interactive"
    assert httpx.get(f"{url}/v1/genq/jobs/{'0' * 32}", timeout=10).status_code == 404

    key = f"idem-{uuid.uuid4().hex}"
    first = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "once", "max_tokens": 8},
        headers={"Idempotency-Key": key},
        timeout=60,
    )
    second = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "once", "max_tokens": 8},
        headers={"Idempotency-Key": key},
        timeout=60,
    )
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    job = first.json()["genq"]["job_id"]
    assert job_starts(db, Keys(settings.namespace))[job] == 1

    long = httpx.post(f"{url}/v1/genq/jobs", json={"model": "tiny", "prompt": "long", "max_tokens": 4000}, timeout=10)
    long_id = long.json()["job_id"]
    wait_for(lambda: httpx.get(f"{url}/v1/genq/jobs/{long_id}", timeout=10).json()["state"] == "running", 30)
    cancelled = httpx.post(f"{url}/v1/genq/jobs/{long_id}/cancel", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("running", "cancelled")
    final = httpx.get(f"{url}/v1/genq/jobs/{long_id}/result", params={"wait": 30}, timeout=40).json()
    assert final["state"] == "cancelled" and final["usage"]["completion_tokens"] < 4000


def test_the_openapi_spec_is_served(gateway: Gateway) -> None:
    spec = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/files",
        "/v1/batches",
        "/v1/batches/{batch_id}/cancel",
        "/v1/genq/jobs",
        "/v1/genq/jobs/{job_id}/result",
    ):
        assert path in spec["paths"], path


def test_results_and_batches_survive_a_gateway_restart_and_a_killed_gateways_batch_is_finished(
    worker: WorkerHandle, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    first = start_gateway(settings, tmp_path)
    try:
        sdk = openai.OpenAI(base_url=f"{first.url}/v1", api_key="x", max_retries=0)
        job = httpx.post(
            f"{first.url}/v1/genq/jobs", json={"model": "tiny", "prompt": "keep", "max_tokens": 8}, timeout=10
        )
        job_id = job.json()["job_id"]
        httpx.get(f"{first.url}/v1/genq/jobs/{job_id}/result", params={"wait": 60}, timeout=70)
        total = 40
        path = write_jsonl(tmp_path / "in.jsonl", [batch_line(f"r{i}", max_tokens=96) for i in range(total)])
        upload = sdk.files.create(file=path.open("rb"), purpose="batch")
        created = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        wait_for(lambda: completed(sdk, created.id) >= 5, 120)
        at_kill = sdk.batches.retrieve(created.id)
    finally:
        first.stop(kill=True)
    second = start_gateway(settings, tmp_path, port=first.port)
    try:
        sdk = openai.OpenAI(base_url=f"{second.url}/v1", api_key="x", max_retries=0)
        assert at_kill.status == "in_progress", "the batch finished before the kill: nothing was adopted"
        kept = httpx.get(f"{second.url}/v1/genq/jobs/{job_id}/result", timeout=10)
        assert kept.status_code == 200 and kept.json()["state"] == "succeeded"
        assert sdk.files.retrieve(upload.id).bytes == path.stat().st_size
        batch = wait_for(lambda: (b := sdk.batches.retrieve(created.id)).status == "completed" and b, 180)
        failures = sdk.files.content(batch.error_file_id).text if batch.error_file_id else ""
        assert batch.request_counts is not None and batch.request_counts.completed == total, failures
        assert batch.output_file_id is not None
        lines = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
        assert Counter(line["custom_id"] for line in lines) == Counter(f"r{i}" for i in range(total))
        keys = Keys(settings.namespace)
        batch_jobs = [j.decode() for j in db.hkeys(keys.batch_jobs(created.id))]
        starts = job_starts(db, keys)
        assert len(batch_jobs) == total and all(starts[j] == 1 for j in batch_jobs)
    finally:
        second.stop()


def completed(sdk: openai.OpenAI, batch_id: str) -> int:
    counts = sdk.batches.retrieve(batch_id).request_counts
    return 0 if counts is None else counts.completed
