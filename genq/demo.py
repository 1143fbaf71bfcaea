"""`genq demo`: the whole path on embedded defaults, so anyone can see genq work before choosing a model.

A private Redis (unless GENQ_REDIS_URL names one), the tiny model, one mlx worker, a small
batch of prompts, and each result printed with its timings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from genq.local_redis import LocalRedis
from genq.tiny_model import ensure_tiny_model
from jobcontract.keys import Keys, pool_name
from jobcontract.models import Backend, GenerationRequest, GenerationResult
from jobcontract.settings import GenqSettings
from producer.client import Client

PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "A job runner queues prompts and",
    "Redis streams deliver each entry",
    "The worker owns its server, so",
    "Apple Silicon machines run MLX",
    "When a server freezes, the job",
    "Tokens per second is a measure of",
]


@contextlib.contextmanager
def redis_for_demo() -> Iterator[str]:
    if os.environ.get("GENQ_REDIS_URL"):
        yield os.environ["GENQ_REDIS_URL"]
        return
    with LocalRedis() as local:
        print(f"started a private redis-server on {local.url}")
        yield local.url


@contextlib.contextmanager
def worker_process(redis_url: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "GENQ_REDIS_URL": redis_url}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "genq", "worker", "--model", "tiny", "--backend", "mlx"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_pool(
    settings: GenqSettings, model: str, backend: Backend, worker: subprocess.Popen[bytes], timeout_s: float = 180
) -> None:
    key = Keys(settings.namespace).pool(pool_name(model, backend))
    deadline = time.monotonic() + timeout_s
    with Client(settings) as client:
        while client.redis.zcard(key) == 0:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not become ready")
            time.sleep(0.1)


def run_demo(*, prompts: int, max_tokens: int) -> int:
    base = GenqSettings()
    mlx_folder, gguf = ensure_tiny_model(base.models_dir)
    print(f"tiny model: {mlx_folder} (and {gguf.name})")
    log_path = Path("~/.cache/genq/logs/demo-worker.log").expanduser()
    with redis_for_demo() as url, worker_process(url, log_path) as worker:
        settings = base.model_copy(update={"redis_url": url})
        started = time.monotonic()
        wait_for_pool(settings, "tiny", Backend.MLX, worker)
        print(
            f"mlx worker ready in {time.monotonic() - started:.1f}s (log: {log_path}); submitting {prompts} prompts\n"
        )
        with Client(settings) as client:
            requests = [
                GenerationRequest(
                    model="tiny",
                    prompt=PROMPTS[i % len(PROMPTS)],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    metadata={"n": str(i)},
                )
                for i in range(prompts)
            ]
            job_ids = client.submit_many(requests)
            results = client.results(job_ids, timeout=300)
        for result in results:
            print(describe(result))
        failed = [r for r in results if not r.ok]
        print(f"\n{len(results) - len(failed)}/{len(results)} succeeded")
        return 1 if failed else 0


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:7.1f} ms"


def describe(result: GenerationResult) -> str:
    t = result.timings
    rate = "-" if result.tokens_per_s is None else f"{result.tokens_per_s:6.0f} tok/s"
    head = (
        f"[{result.job_id[:8]}] {result.state.value:9} {result.backend.value if result.backend else '-':8} "
        f"queue {ms(t.queue_wait_s)}  ttft {ms(t.time_to_first_token_s)}  total {ms(t.total_s)}  "
        f"{result.usage.completion_tokens:3d} tok  {rate}"
    )
    text = result.text.replace("\n", " ")[:70] if result.ok else (result.error.message if result.error else "")
    return f"{head}\n    {text!r}"
