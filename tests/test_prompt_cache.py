"""Cached prompt tokens end to end on real parts: a real `genq worker` owning a real mlx_lm.server
(or llama-server) on the tiny model, the real gateway, the worker's /metrics. Jobs that share a
long instruction run one after another on one server, so from the second on the server takes the
instruction from its prompt cache, and says so in `usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from jobcontract.models import GenerationRequest, GenerationResult
from jobcontract.prefix import prefix_fingerprint
from jobcontract.settings import GenqSettings
from producer.client import Client
from producer.openai_format import COMPLETIONS_URL, parse_body, to_request
from tests.callers import batch_line, genq_env, read_jsonl, write_jsonl
from tests.harness import WorkerHandle, start_worker, wait_until
from tests.metrics_helpers import free_port, gateway_app, scrape, serving, value
from workers.backend_client import cached_prompt_tokens

# About 300 tokens of the tiny model's byte-level vocabulary: well inside its 512-token context.
INSTRUCTION = (
    "You label customer reviews. Read the review after the line and answer with one word: positive, "
    "negative or mixed. A review that praises and complains is mixed. Sarcasm counts as negative. "
) * 3


def ask(tail: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": INSTRUCTION + "\n---\n" + tail, "max_tokens": 8, "temperature": 0, **extra}


@dataclass
class Stack:
    settings: GenqSettings
    worker: WorkerHandle
    metrics_url: str
    gateway: httpx.Client


@pytest.fixture
def stack(settings: GenqSettings, tmp_path: Path) -> Iterator[Stack]:
    """One mlx worker process (so every job meets the same server's cache) and the gateway."""
    metrics_port, gateway_port = free_port(), free_port()
    with ExitStack() as started:
        worker = start_worker(
            settings, tmp_path, processes=1, concurrency=2, wait=False, extra_args=["--metrics-port", str(metrics_port)]
        )
        started.callback(worker.stop)
        url = started.enter_context(serving(gateway_app(settings), gateway_port))
        gateway = started.enter_context(httpx.Client(base_url=url, timeout=60))
        worker.wait_ready()
        yield Stack(settings, worker, f"http://127.0.0.1:{metrics_port}/metrics", gateway)


def cached(result: GenerationResult) -> int:
    return result.usage.prompt_tokens_details.cached_tokens


def test_a_shared_prefix_is_reported_cached_in_the_result_the_gateway_and_the_metric(stack: Stack) -> None:
    with Client(stack.settings) as client:
        first = client.generate(ask("Great value, arrived early."), timeout=60)
        second = client.generate(ask("Broke after a day."), timeout=60)
        # Streamed: the count comes in the server's usage chunk instead of the answer.
        streamed = client.generate(ask("Nice colour, awful smell.", stream=True), timeout=60)
    assert first.ok and second.ok and streamed.ok, [first.error, second.error, streamed.error]
    assert 0 <= cached(first) < first.usage.prompt_tokens
    # The instruction (all but the review) came from the server's prompt cache.
    assert first.usage.prompt_tokens // 2 < cached(second) < second.usage.prompt_tokens
    assert first.usage.prompt_tokens // 2 < cached(streamed) < streamed.usage.prompt_tokens

    completion = stack.gateway.post("/v1/completions", json=ask("Does what it says."))
    assert completion.status_code == 200, completion.text
    usage = completion.json()["usage"]
    assert usage["prompt_tokens"] // 2 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]

    # A caller's prompt_cache_key (OpenAI's parameter) is accepted and names the prefix.
    keyed = stack.gateway.post("/v1/completions", json={**ask("Solid."), "prompt_cache_key": "reviews-v1"})
    assert keyed.status_code == 200, keyed.text
    keyed_usage = keyed.json()["usage"]

    chat_usage = []
    for review in ("Love it.", "Hate it."):
        chat = {
            "model": "tiny",
            "messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": review}],
            "max_tokens": 8,
            "temperature": 0,
        }
        answer = stack.gateway.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        chat_usage.append(answer.json()["usage"])
    assert chat_usage[1]["prompt_tokens"] // 2 < chat_usage[1]["prompt_tokens_details"]["cached_tokens"]

    # The streamed gateway answer's usage chunk carries it too.
    body = {**ask("Fine."), "stream": True, "stream_options": {"include_usage": True}}
    with stack.gateway.stream("POST", "/v1/completions", json=body) as events:
        chunks = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")]
    [usage_chunk] = [c for c in chunks if c.get("usage")]
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    # The worker counts every one of them beside the prompt tokens (after each result is recorded).
    expected = (
        sum(cached(r) for r in (first, second, streamed))
        + usage["prompt_tokens_details"]["cached_tokens"]
        + keyed_usage["prompt_tokens_details"]["cached_tokens"]
        + sum(u["prompt_tokens_details"]["cached_tokens"] for u in chat_usage)
        + usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    )

    def counted() -> float:
        return value(scrape(stack.metrics_url), "genq_prompt_cached_tokens_total", model="tiny", backend="mlx")

    assert wait_until(lambda: counted() == expected, 10), (counted(), expected)
    samples = scrape(stack.metrics_url)
    assert 0 < value(samples, "genq_prompt_cached_tokens_total") < value(samples, "genq_prompt_tokens_total")


def test_an_openai_body_passes_its_prompt_cache_key_to_the_fingerprint() -> None:
    bodies = [
        parse_body(COMPLETIONS_URL, {"model": "tiny", "prompt": text, "prompt_cache_key": "rubric-7"})
        for text in ("one prompt", "another prompt")
    ]
    requests = [GenerationRequest.model_validate(to_request(b)) for b in bodies]
    assert [r.prompt_cache_key for r in requests] == ["rubric-7", "rubric-7"]
    assert prefix_fingerprint(requests[0]) == prefix_fingerprint(requests[1])
    with pytest.raises(ValidationError):
        parse_body(COMPLETIONS_URL, {"model": "tiny", "prompt": "x", "prompt_cache_key": ""})


def test_cached_tokens_are_read_wherever_each_server_reports_them() -> None:
    """The shapes the servers answer in (see workers.backend_client.cached_prompt_tokens); the real
    servers' current answers are checked by the tests above."""
    openai = {"prompt_tokens": 339, "prompt_tokens_details": {"cached_tokens": 336}}
    assert cached_prompt_tokens(openai, {}, 339) == 336
    # A llama-server build with timings but without the OpenAI field.
    assert cached_prompt_tokens({"prompt_tokens": 339}, {"cache_n": 336, "prompt_n": 3}, 339) == 336
    # llama_cpp.server: nothing said, nothing counted; never more than the prompt.
    assert cached_prompt_tokens({"prompt_tokens": 339}, {}, 339) == 0
    assert cached_prompt_tokens({"prompt_tokens_details": {"cached_tokens": 900}}, {}, 339) == 339
    assert cached_prompt_tokens({"prompt_tokens_details": {"cached_tokens": "?"}}, {}, 339) == 0


def test_batch_output_lines_carry_the_cached_prompt_tokens(stack: Stack, tmp_path: Path) -> None:
    lines = [batch_line(f"r{n}", max_tokens=4, prompt=ask(f"Review number {n}.")["prompt"]) for n in range(6)]
    output = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "genq",
            "batch",
            "run",
            str(write_jsonl(tmp_path / "in.jsonl", lines)),
            "-o",
            str(output),
        ],
        env=genq_env(stack.settings),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    usages = [line["response"]["body"]["usage"] for line in read_jsonl(output)]
    assert len(usages) == 6
    # The worker runs two at a time: the first two meet an empty cache, every later one a warm one.
    hits = [u for u in usages if u["prompt_tokens"] // 2 < u["prompt_tokens_details"]["cached_tokens"]]
    assert len(hits) >= 4, usages


def test_a_prompt_that_is_an_earlier_prompt_and_its_answer_does_not_kill_mlx_lm_server(stack: Stack) -> None:
    """mlx-lm 0.32.2 keeps a finished request's prompt and output in its cache; a later prompt of
    exactly those tokens (a continuation sent back) left it nothing to process, and its generation
    thread died with "has an empty prompt": every job in flight failed and the server was restarted.
    genq starts it through workers.servers.mlx_server, which mends that lookup."""
    [server] = stack.worker.server_pids()
    with Client(stack.settings) as client:
        head = "Once upon a time"
        first = client.generate({"model": "tiny", "prompt": head, "max_tokens": 1, "temperature": 0}, timeout=60)
        assert first.ok, first.error
        again = {"model": "tiny", "prompt": head + first.text, "max_tokens": 4, "temperature": 0}
        continued = client.generate(again, timeout=60)
        assert continued.ok, continued.error
        assert len(continued.attempts) == 1, continued.attempts  # not a retry after a dead server
        assert cached(continued) == continued.usage.prompt_tokens - 1  # all but the token it re-reads
        later = client.generate({"model": "tiny", "prompt": "And then", "max_tokens": 4}, timeout=60)
        assert later.ok, later.error
    assert stack.worker.server_pids() == [server], "the server was restarted"


def test_the_worker_passes_its_prompt_cache_settings_to_mlx_lm_server(settings: GenqSettings, tmp_path: Path) -> None:
    """GENQ_PROMPT_CACHE_SIZE 0: the server keeps no prompt cache, so nothing is reported cached."""
    worker = start_worker(settings, tmp_path, wait=False, extra_args=["--prompt-cache-size", "0"])
    try:
        worker.wait_ready()
        [server] = worker.server_pids()
        argv = Path(f"/proc/{server}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--prompt-cache-size") + 1] == "0"
        assert int(argv[argv.index("--prompt-cache-bytes") + 1]) > 0
        with Client(settings) as client:
            results = [client.generate(ask(review), timeout=60) for review in ("Good.", "Bad.")]
        assert all(r.ok for r in results), [r.error for r in results]
        assert [cached(r) for r in results] == [0, 0]
    finally:
        worker.stop()


def test_llama_server_reports_its_cached_prompt_tokens_too(
    settings: GenqSettings, tmp_path: Path, llama_server_binary: str
) -> None:
    """llama-server keeps each slot's last prompt and picks the slot whose prompt is most alike."""
    worker = start_worker(
        settings,
        tmp_path,
        backend="llamacpp",
        concurrency=2,
        wait=False,
        extra_args=["--llama-server", llama_server_binary],
    )
    try:
        worker.wait_ready()
        with Client(settings) as client:
            plain = [client.generate(ask(r, backend="llamacpp"), timeout=60) for r in ("Good.", "Bad.")]
            streamed = client.generate(ask("Meh.", backend="llamacpp", stream=True), timeout=60)
    finally:
        worker.stop()
    assert all(r.ok for r in [*plain, streamed]), [r.error for r in [*plain, streamed]]
    assert {r.backend.value for r in [*plain, streamed] if r.backend} == {"llamacpp"}
    assert plain[1].usage.prompt_tokens // 2 < cached(plain[1]) < plain[1].usage.prompt_tokens
    assert streamed.usage.prompt_tokens // 2 < cached(streamed) < streamed.usage.prompt_tokens
