"""`genq demo`: the whole path on embedded defaults, so anyone can see genq work before choosing a model.

A private Redis (unless GENQ_REDIS_URL names one), the tiny model, one mlx worker, a small
batch of prompts, and each result printed with its timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from genq.local_stack import LocalStack
from jobcontract.models import GenerationRequest, GenerationResult
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


def run_demo(*, prompts: int, max_tokens: int) -> int:
    base = GenqSettings()
    log_dir = Path("~/.cache/genq/logs/demo").expanduser()
    # A private Redis unless GENQ_REDIS_URL names one; the worker dies with this process whatever happens.
    with LocalStack(redis_url=os.environ.get("GENQ_REDIS_URL"), models_dir=base.models_dir, run_dir=log_dir) as stack:
        print(f"tiny model: {stack.mlx_model} (and {stack.gguf_model.name})")
        if stack.redis is not None:
            print(f"started a private redis-server on {stack.url}")
        settings = base.model_copy(update={"redis_url": stack.url})
        started = time.monotonic()
        worker = stack.start_worker(settings, backend="mlx", wait=False)
        worker.wait_ready(timeout=180, servers=False, interval=0.1)
        print(
            f"mlx worker ready in {time.monotonic() - started:.1f}s (log: {worker.log_path}); "
            f"submitting {prompts} prompts\n"
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
