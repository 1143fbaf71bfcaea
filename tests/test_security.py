"""Security of a shared deployment, on real parts: a private redis-server that wants a password (an
ACL user), a real mlx worker and `genq gateway` subprocesses with API keys, called over HTTP.

Covers: API keys (missing, wrong, right, from a file as a hash only, compared in constant time),
per-key rate limits shared by two gateways, per-key bounds on unfinished jobs and batches,
loopback-only without keys, bounds on every input (4xx, nothing queued), model names that are
paths, flags or hub repos, and that no secret reaches a log, an error or a backend server."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import redis

from genq.local_redis import LocalRedis
from jobcontract.connection import connect, redact
from jobcontract.keys import Keys
from jobcontract.models import Backend
from jobcontract.settings import GenqSettings
from producer.gateway import api_keys
from producer.gateway.api_keys import ApiKeyEntry, KeyRing
from producer.gateway.settings import GatewaySettings
from tests.callers import Gateway, batch_line, genq_env, job_keys, wait_for, write_jsonl
from tests.harness import WorkerHandle, start_worker
from tests.security_helpers import LockedRedis, lock, start_gateway_process

ALPHA = f"sk-alpha-{uuid.uuid4().hex}"  # bounds on unfinished work
BETA = f"sk-beta-{uuid.uuid4().hex}"  # a low rate
GAMMA = f"sk-gamma-{uuid.uuid4().hex}"  # configured in a file, by its hash only
NO_BATCHES = f"sk-nobatch-{uuid.uuid4().hex}"
KEYS = (ALPHA, BETA, GAMMA, NO_BATCHES)
MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024
MAX_BATCH_LINES = 5


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedRedis]:
    with LocalRedis() as server:
        yield lock(server)


@pytest.fixture(scope="module")
def settings(locked: LockedRedis, models_dir: Path) -> GenqSettings:
    return GenqSettings(redis_url=locked.url, namespace=f"s{uuid.uuid4().hex[:10]}", models_dir=models_dir)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def worker(settings: GenqSettings, log_dir: Path) -> Iterator[WorkerHandle]:
    handle = start_worker(settings, log_dir, concurrency=2)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gateway_env(log_dir: Path) -> dict[str, str]:
    keys_file = log_dir / "keys.toml"
    keys_file.write_text(
        f'[[keys]]\nname = "gamma"\nkey_sha256 = "{hashlib.sha256(GAMMA.encode()).hexdigest()}"\nrate = "unlimited"\n'
    )
    listed = [
        {"key": ALPHA, "name": "alpha", "max_queued": 2, "max_batches": 1},
        {"key": BETA, "name": "beta", "rate": "4/minute"},
        {"key": NO_BATCHES, "name": "nobatch", "max_batches": 0},
    ]
    return {
        "GENQ_GATEWAY_API_KEYS": json.dumps(listed),
        "GENQ_GATEWAY_API_KEYS_FILE": str(keys_file),
        "GENQ_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
        "GENQ_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "GENQ_GATEWAY_MAX_BATCH_LINES": str(MAX_BATCH_LINES),
    }


@pytest.fixture(scope="module")
def gateway(settings: GenqSettings, log_dir: Path, gateway_env: dict[str, str]) -> Iterator[Gateway]:
    handle = start_gateway_process(settings, log_dir, gateway_env)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def db(settings: GenqSettings) -> Iterator[redis.Redis]:
    client = connect(settings.redis_url)
    yield client
    client.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(prompt: str = "hello", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def assert_openai_error(response: httpx.Response, status: int, words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], (words, error)
    return error


def test_without_a_right_key_every_endpoint_answers_401_and_queues_nothing(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    before = job_keys(db, Keys(settings.namespace))
    near_misses = [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        f"Bearer {ALPHA[:-1]}",  # a prefix of a key
        f"Bearer {ALPHA}x",  # a key and more
        f"Bearer {ALPHA.upper()}",
        f"Basic {ALPHA}",
        f"Bearer {hashlib.sha256(GAMMA.encode()).hexdigest()}",  # the configured hash is not the key
        ALPHA,  # no scheme
    ]
    for header in near_misses:
        headers = {} if header is None else {"Authorization": header}
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", ask()),
            ("POST", "/v1/genq/jobs", ask()),
            ("GET", "/v1/files", None),
            ("GET", "/v1/batches", None),
        ):
            response = httpx.request(method, gateway.url + path, json=body, headers=headers, timeout=10)
            error = assert_openai_error(response, 401, "API key")
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert job_keys(db, Keys(settings.namespace)) == before

    # The right keys, a listed one and one configured in a file by its hash only; the scheme's case is free.
    for key in (ALPHA, GAMMA):
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
        completion = sdk.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
        assert completion.choices[0].text and completion.usage is not None
    lower = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"bearer {GAMMA}"}, timeout=10)
    assert lower.status_code == 200 and [m["id"] for m in lower.json()["data"]] == ["tiny"]


def test_every_configured_key_is_compared_by_compare_digest_without_stopping_at_a_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Constant time, checked through behaviour: every lookup makes one compare_digest per configured
    key on equal-length digests, whichever key matches and whether any does."""
    keys = [f"key-{i}-{'x' * i}" for i in range(1, 6)]
    ring = KeyRing.from_entries(
        [ApiKeyEntry.model_validate({"key": k}) for k in keys], rate="10/second", max_queued=1, max_batches=1
    )
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    for token in [*keys, "nope", keys[0] + "x", keys[-1][:-1], "", "é" * 300]:
        calls.clear()
        found = ring.match(token)
        assert (found is not None) == (token in keys)
        if found is not None:
            assert found.digest == hashlib.sha256(token.encode()).digest()
        assert calls == [(32, 32)] * len(keys), token
    # No key is kept or shown as given: not in the ring, not in the settings' repr.
    for key in keys:
        assert key not in repr(ring.keys)
    settings = GatewaySettings(gateway_api_keys=",".join(keys))
    assert not any(k in repr(settings) or k in str(settings.model_dump()) for k in keys)


def test_settings_errors_never_quote_the_keys() -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    for value in (f'["{secret}"', f'[{{"key": "{secret}", "rate": "often"}}]', f'[{{"key": "{secret}", "x": 1}}]'):
        with pytest.raises(ValueError) as caught:
            GatewaySettings(gateway_api_keys=value)
        assert secret not in str(caught.value)
    with pytest.raises(ValueError, match="unique"):
        _ = GatewaySettings(
            gateway_api_keys=json.dumps([{"key": "a", "name": "n"}, {"key": "b", "name": "n"}])
        ).key_ring


def test_a_keys_rate_is_shared_by_every_gateway_and_other_keys_are_not_slowed(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, log_dir: Path, gateway_env: dict[str, str]
) -> None:
    second = start_gateway_process(settings, log_dir, gateway_env)
    try:
        # Endpoints that also ask for the caller (completions) count once per request, like any other.
        answers = [
            httpx.get(f"{gateway.url}/v1/models", headers=auth(BETA), timeout=10),
            httpx.post(f"{second.url}/v1/completions", json=ask(), headers=auth(BETA), timeout=60),
            httpx.post(f"{gateway.url}/v1/completions", json=ask(), headers=auth(BETA), timeout=60),
            httpx.get(f"{second.url}/v1/models", headers=auth(BETA), timeout=10),
        ]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        for g in (second, gateway):
            refused = httpx.get(f"{g.url}/v1/models", headers=auth(BETA), timeout=10)
            error = assert_openai_error(refused, 429, "'beta' is over its rate limit of 4 per 1 minute")
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{second.url}/v1", api_key=BETA, max_retries=0).models.list()
        for g in (gateway, second):
            assert httpx.get(f"{g.url}/v1/models", headers=auth(GAMMA), timeout=10).status_code == 200
    finally:
        second.stop()


def test_a_key_has_at_most_its_bound_of_unfinished_jobs(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    keys = Keys(settings.namespace)
    url = gateway.url
    held = []
    for i in range(2):
        response = httpx.post(f"{url}/v1/genq/jobs", json=ask(f"long {i}", 4000), headers=auth(ALPHA), timeout=10)
        assert response.status_code == 202, response.text
        held.append(response.json()["job_id"])
    before = job_keys(db, keys)
    for path, body in (("/v1/genq/jobs", ask("third", 4000)), ("/v1/completions", ask("third"))):
        refused = httpx.post(url + path, json=body, headers=auth(ALPHA), timeout=10)
        error = assert_openai_error(refused, 429, "'alpha' has 2 unfinished jobs, its limit")
        assert error["code"] == "too_many_unfinished_jobs" and refused.headers["retry-after"] == "2"
    assert job_keys(db, keys) == before, "a refused job was queued"
    # Another key has its own bound.
    other = httpx.post(f"{url}/v1/genq/jobs", json=ask("other"), headers=auth(GAMMA), timeout=10)
    assert other.status_code == 202
    httpx.post(f"{url}/v1/genq/jobs/{other.json()['job_id']}/cancel", headers=auth(GAMMA), timeout=10)

    # A finished job frees its slot: cancel one, and the next submit is admitted.
    assert httpx.post(f"{url}/v1/genq/jobs/{held[0]}/cancel", headers=auth(ALPHA), timeout=10).status_code == 200
    wait_for(lambda: db.hget(keys.job(held[0]), "state") == b"cancelled", 30)
    admitted = httpx.post(f"{url}/v1/completions", json=ask("now there is room"), headers=auth(ALPHA), timeout=60)
    assert admitted.status_code == 200, admitted.text
    members = {m.decode() for m in db.zrange(keys.caller_jobs("alpha"), 0, -1)}
    assert held[1] in members and held[0] not in members
    httpx.post(f"{url}/v1/genq/jobs/{held[1]}/cancel", headers=auth(ALPHA), timeout=10)
    wait_for(lambda: db.hget(keys.job(held[1]), "state") == b"cancelled", 30)


def test_a_key_has_at_most_its_bound_of_unfinished_batches_and_a_batch_at_most_its_lines(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.namespace)
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ALPHA, max_retries=0)
    path = write_jsonl(tmp_path / "long.jsonl", [batch_line(f"l{i}", max_tokens=3000) for i in range(2)])
    upload = sdk.files.create(file=path.open("rb"), purpose="batch")
    first = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError, match="'alpha' has 1 unfinished batches"):
        sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.PermissionDeniedError, match="may not create batches"):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=NO_BATCHES, max_retries=0).batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
    sdk.batches.cancel(first.id)
    wait_for(lambda: sdk.batches.retrieve(first.id).status == "cancelled", 60)

    # Room again; and a file over the line bound fails validation with nothing queued.
    before = job_keys(db, keys)
    lines = [batch_line(f"m{i}") for i in range(MAX_BATCH_LINES + 1)]
    big = sdk.files.create(file=write_jsonl(tmp_path / "big.jsonl", lines).open("rb"), purpose="batch")
    second = sdk.batches.create(input_file_id=big.id, endpoint="/v1/completions", completion_window="24h")
    failed = wait_for(lambda: (b := sdk.batches.retrieve(second.id)).status == "failed" and b, 60)
    assert failed.errors is not None and failed.errors.data is not None
    assert failed.errors.data[0].code == "too_many_lines"
    assert f"more than {MAX_BATCH_LINES} lines" in (failed.errors.data[0].message or "")
    assert job_keys(db, keys) == before


BAD_MODELS = [
    "../../etc/passwd",
    "/srv/models/x.gguf",
    "~/models/tiny",
    "--help",
    "-m",
    "meta-llama/Llama-3.1-8B-Instruct",
    "hf://tiny",
    "tiny --port 1",
    "tiny;id",
    "$(id)",
    "tiny\n",
    "TINY",
    "tiny.mlx",
    "",
]


def test_a_model_name_that_is_a_path_a_flag_or_a_hub_repo_is_refused_and_never_reaches_a_server(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis, tmp_path: Path
) -> None:
    keys = Keys(settings.namespace)
    before = job_keys(db, keys)
    for model in BAD_MODELS:
        for path, body in (
            ("/v1/completions", {"model": model, "prompt": "x"}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}),
            ("/v1/genq/jobs", {"model": model, "prompt": "x"}),
        ):
            response = httpx.post(gateway.url + path, json=body, headers=auth(GAMMA), timeout=10)
            assert response.status_code in (400, 404), (model, path, response.text)
            assert response.json()["error"]["param"] in ("model", None), response.text
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GAMMA, max_retries=0)
    lines = [batch_line(f"b{i}", model=m) for i, m in enumerate(BAD_MODELS[:MAX_BATCH_LINES])]
    path = write_jsonl(tmp_path / "models.jsonl", lines)
    upload = sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    failed = wait_for(lambda: (b := sdk.batches.retrieve(batch.id)).status == "failed" and b, 60)
    assert failed.errors is not None and failed.errors.data is not None
    assert [e.line for e in failed.errors.data] == list(range(1, MAX_BATCH_LINES + 1))
    assert job_keys(db, keys) == before

    # Servers are started from the routes config alone, on loopback, without genq's settings.
    servers = [psutil.Process(pid) for pid in worker.server_pids()]
    assert servers
    for server in servers:
        argv = server.cmdline()
        assert argv[argv.index("--model") + 1] == settings.routes.get("tiny").backend(Backend.MLX).path
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert not any(model and model in " ".join(argv) for model in BAD_MODELS if model not in ("-m",))
        assert not any(name.startswith("GENQ_") for name in server.environ()), "genq settings leaked to a server"
        listening = [c.laddr.ip for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(ip == "127.0.0.1" for ip in listening), listening


def test_every_input_is_bounded_with_a_clear_4xx_and_nothing_queued(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, db: redis.Redis
) -> None:
    keys = Keys(settings.namespace)
    done = httpx.post(f"{gateway.url}/v1/genq/jobs", json=ask("kept"), headers=auth(GAMMA), timeout=10).json()
    job_id = done["job_id"]
    wait_for(lambda: db.hget(keys.job(job_id), "state") == b"succeeded", 60)
    before = job_keys(db, keys)
    msg = [{"role": "user", "content": "x"}]
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/completions", ask("x" * (MAX_PROMPT_CHARS + 1)), 400, f"over the limit of {MAX_PROMPT_CHARS}"),
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": msg * 1025}, 400, "messages"),
        ("POST", "/v1/completions", ask(max_tokens=5000), 400, "over this deployment's cap of 4096"),
        ("POST", "/v1/completions", ask(max_tokens=10**9), 400, "max_tokens"),
        ("POST", "/v1/completions", ask(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        ("POST", "/v1/completions", ask(stop="s" * 257), 400, "stop"),
        ("POST", "/v1/completions", ask(stop=""), 400, "stop"),
        ("POST", "/v1/completions", ask(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
        ("POST", "/v1/completions", ask(metadata={"k": "v" * 513}), 400, "metadata"),
        ("POST", "/v1/completions", ask(metadata={"k" * 65: "v"}), 400, "metadata"),
        ("POST", "/v1/completions", ask(timeout_s=10**9), 400, "timeout_s"),
        ("POST", "/v1/completions", ask(seed=2**64), 400, "seed"),
        ("POST", "/v1/completions", ask(user="u" * 257), 400, "user"),
        ("POST", "/v1/genq/jobs", ask(idempotency_key="i" * 257), 400, "idempotency_key"),
        ("POST", "/v1/completions", ask(), 400, "Idempotency-Key: String should have at most 256 characters"),
        ("POST", "/v1/completions", ask("x" * MAX_BODY_BYTES), 413, f"over the limit of {MAX_BODY_BYTES} bytes"),
        ("POST", "/v1/completions", '{"model": "tiny", "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}", 400, ""),
        ("GET", f"/v1/genq/jobs/{job_id}:events", None, 400, "job_id"),
        ("GET", f"/v1/genq/jobs/{job_id}:events/result", None, 400, "job_id"),
        ("POST", f"/v1/genq/jobs/{'j' * 129}/cancel", None, 400, "job_id"),
        ("GET", "/v1/files/file-x:content", None, 400, "file_id"),
        ("GET", "/v1/batches/batch_x:jobs", None, 400, "batch_id"),
        ("POST", "/v1/batches", {"input_file_id": "f:content", "endpoint": "/v1/completions"}, 400, "input_file_id"),
        (
            "POST",
            "/v1/batches",
            {"input_file_id": "file-x", "endpoint": "/v1/completions", "metadata": {"k": "v" * 513}},
            400,
            "metadata",
        ),
    ]
    for method, path, body, status, words in cases:
        content = body if isinstance(body, str) or body is None else json.dumps(body)
        headers = {**auth(GAMMA), "content-type": "application/json"}
        if "Idempotency-Key" in words:
            headers["Idempotency-Key"] = "i" * 257
        response = httpx.request(method, gateway.url + path, content=content, headers=headers, timeout=30)
        assert_openai_error(response, status, words)
    assert job_keys(db, keys) == before
    assert db.hget(keys.job(job_id), "state") == b"succeeded"


def test_without_keys_the_gateway_serves_loopback_only_and_says_so(
    settings: GenqSettings, log_dir: Path, locked: LockedRedis
) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "genq", "gateway", "--host", "0.0.0.0", "--port", "1"],
        env=genq_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in refused.stderr

    keyless = start_gateway_process(settings, log_dir, {})
    try:
        assert "WARNING genq.gateway: no API keys configured" in keyless.log()
        assert httpx.get(f"{keyless.url}/v1/models", timeout=10).status_code == 200
    finally:
        keyless.stop()

    # Served some other way on every address, it still answers only callers on its own host.
    argv = [sys.executable, "-m", "uvicorn", "--factory", "producer.gateway.app:create_app", "--host", "0.0.0.0"]
    exposed = start_gateway_process(settings, log_dir, {}, argv=argv)
    try:
        assert httpx.get(f"{exposed.url}/v1/models", timeout=10).status_code == 200
        outside = httpx.get(f"http://{own_address()}:{exposed.port}/v1/models", timeout=10)
        error = assert_openai_error(outside, 403, "callers on its own host only")
        assert error["code"] == "loopback_only"
    finally:
        exposed.stop()


def own_address() -> str:
    """This host's address on its outward interface (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))
        address = str(probe.getsockname()[0])
    assert not address.startswith("127."), "this test needs a non-loopback interface"
    return address


def test_no_secret_reaches_a_log_an_error_or_a_server(
    worker: WorkerHandle, gateway: Gateway, settings: GenqSettings, locked: LockedRedis, log_dir: Path
) -> None:
    # Errors genq prints when the password is wrong or Redis is away name the URL redacted.
    wrong = settings.redis_url.replace(locked.password, "not-" + locked.password)
    away = f"redis://genq:{locked.password}@127.0.0.1:1/0?password={locked.default_password}"
    outputs = []
    for url in (wrong, away):
        run = subprocess.run(
            [sys.executable, "-m", "genq", "status", "0" * 32],
            env={**genq_env(settings), "GENQ_REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode != 0
        outputs.append(run.stdout + run.stderr)
    assert redact(away) in outputs[1]
    bad_keys = subprocess.run(
        [sys.executable, "-m", "genq", "gateway", "--port", "1"],
        env={**genq_env(settings), "GENQ_GATEWAY_API_KEYS": f'["{ALPHA}", {{"key": "{BETA}", "rate": "x"}}]'},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_keys.returncode != 0 and "rate" in bad_keys.stderr
    outputs.append(bad_keys.stdout + bad_keys.stderr)

    logs = [p for p in log_dir.rglob("*") if p.is_file() and p.name != "keys.toml"]
    assert any("gateway" in p.name for p in logs) and any("worker" in p.name for p in logs)
    texts = [p.read_text(errors="replace") for p in logs] + outputs
    assert any("API key alpha: rate" in t for t in texts), "the gateway names its keys at start"
    for secret in (*locked.secrets, *KEYS):
        leaks = [p for p, t in zip([*logs, "outputs", "outputs", "outputs"], texts, strict=True) if secret in t]
        assert not leaks, f"a secret appears in {leaks}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw-1@h:1/0", "redis://:***@h:1/0"),
        (
            "rediss://user:p%40ss-2@[::1]:6380/0?ssl_ca_certs=/x&password=pw-3",
            "rediss://user:***@[::1]:6380/0?ssl_ca_certs=/x&password=***",
        ),
        ("redis://u:p@ss-4@host:1/0", "redis://u:***@host:1/0"),
        ("unix:///tmp/r.sock?password=pw-5&db=1", "unix:///tmp/r.sock?password=***&db=1"),
        ("redis://:pw-6@h:notaport/0", "redis://:***@h:notaport/0"),
        ("redis://:pw-7@[bad", "<unparsable Redis URL>"),
    ],
)
def test_redact_masks_every_place_redis_py_takes_a_password_from(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "pw-" not in redact(url) and "ss-" not in redact(url)
