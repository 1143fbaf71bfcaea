"""How to launch and talk to each backend server: the only place their differences live."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobcontract.models import Backend
from workers.servers.supervisor import Launch

# mlx_lm.server, with an upstream defect of its prompt cache mended (see that module).
MLX_SERVER_MODULE = "workers.servers.mlx_server"

if TYPE_CHECKING:
    from workers.settings import WorkerSettings


@dataclass(frozen=True)
class ServerSpec:
    """A server command line and the quirks a caller must absorb so every backend behaves alike."""

    name: str
    backend: Backend
    argv_head: tuple[str, ...]
    port_flag: str
    readiness_path: str
    # Probed while serving; must answer while a generation holds the model (defaults to readiness_path).
    liveness_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # What to send as "model": mlx_lm.server treats any name but its own --model as a hub repo.
    request_model: str | None = None
    # Fields sent on every request, so defaults that differ between servers never leak to callers.
    request_defaults: dict[str, Any] = field(default_factory=dict)
    sends_usage_when_streaming: bool = True
    # llama_cpp.server answers a refused streamed request (prompt over the context) with 200 and an
    # empty body; the reason only shows when the same request is sent without streaming.
    hides_errors_in_streams: bool = False

    def argv(self, port: int) -> list[str]:
        return [*self.argv_head, self.port_flag, str(port)]

    def launch(self, log_path: str) -> Launch:
        """The command part as plain data, for a worker process to start before its imports."""
        return Launch(self.name, self.argv_head, self.port_flag, dict(self.env), log_path)


def _argv(*head: str, flags: list[tuple[str, str]]) -> tuple[str, ...]:
    return (*head, *(part for flag in flags for part in flag))


def default_prompt_cache_size(concurrency: int) -> int:
    """mlx_lm.server's prompt cache (`--prompt-cache-size`) counts KV caches, and every finished
    request leaves one (its prompt and answer; a chat also leaves one per system and user segment).
    With mlx's default of 10, one burst of `concurrency` (16) requests finishing evicts every other
    prefix's cache, so a worker that placement gives a handful of prefixes would keep only the
    latest. Twice the concurrency keeps the caches of the last two bursts, and never fewer than
    mlx's own 10. The cache finds the longest common prefix in any kept entry, so one entry per
    prefix is enough for a hit."""
    return max(10, 2 * concurrency)


def default_prompt_cache_bytes(processes: int) -> int:
    """mlx_lm.server caps its prompt cache at `--prompt-cache-bytes` of KV (its own default: no cap,
    only the count): half the host's memory, shared by the worker's processes (each runs a server).
    Every kept entry is the whole KV of one request, not shared with entries of the same prefix:
    about 128 KB a token on an 8B model, so 290 MB for a 2,000-token instruction and its answer, and
    2 x 16 of those would be 9 GB on a 16 GB Mac. mlx counts the running requests' KV against the cap
    too (and trims only the kept entries, so the cap costs cache hits, never a request): 16 running
    2,000-token requests of that model hold 4.6 GB, so a quarter of a 16 GB Mac would keep nothing
    in the very case the cache is for; half keeps about ten entries beside them."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * 1024**3
    return max(64 * 1024**2, memory // 2 // max(1, processes))


def mlx_spec(
    model_path: str,
    *,
    concurrency: int,
    max_tokens: int,
    hub_cache: Path,
    prompt_cache_size: int | None = None,
    prompt_cache_bytes: int | None = None,
    processes: int = 1,
) -> ServerSpec:
    """mlx_lm.server; `HF_HUB_OFFLINE` and an existing hub cache keep it from reaching for the network
    (with no cache folder its /v1/models answers 200 with an empty body). Its prompt cache (the KV
    of recent prompts, reused for any later prompt that shares a prefix with one) gets the worker's
    size and byte cap (None: the defaults above; a byte cap of 0: none, mlx's own default); it
    reports the reused part as `usage.prompt_tokens_details.cached_tokens`, plain and streamed (in
    the usage chunk)."""
    hub_cache.mkdir(parents=True, exist_ok=True)
    size = default_prompt_cache_size(concurrency) if prompt_cache_size is None else prompt_cache_size
    flags = [
        ("--model", model_path),
        ("--host", "127.0.0.1"),
        ("--max-tokens", str(max_tokens)),
        ("--decode-concurrency", str(concurrency)),
        ("--prompt-concurrency", str(max(1, min(concurrency, 8)))),
        ("--prompt-cache-size", str(size)),
        ("--log-level", "WARNING"),
    ]
    cap = default_prompt_cache_bytes(processes) if prompt_cache_bytes is None else prompt_cache_bytes
    if cap > 0:
        flags.append(("--prompt-cache-bytes", str(cap)))
    return ServerSpec(
        name="mlx_lm.server",
        backend=Backend.MLX,
        argv_head=_argv(sys.executable, "-m", MLX_SERVER_MODULE, flags=flags),
        port_flag="--port",
        readiness_path="/health",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "TRANSFORMERS_OFFLINE": "1"},
        request_model=model_path,
    )


def llama_server_spec(binary: str, gguf_path: str, *, slots: int, context_length: int, threads: int) -> ServerSpec:
    """The C++ llama-server: /health, parallel slots, its own /metrics. Context is shared by slots.

    Its OpenMP threads spin while they wait for work (the default active wait policy), burning a
    core between and during requests; `OMP_WAIT_POLICY=passive` makes them sleep. Measured here
    (bench/results/worker_cpu.md, 3x60 jobs): 64-token jobs 49 -> 11 ms of server CPU per job,
    4-token jobs 13.5 -> 3.0 ms, and 60 jobs finished in 0.8 s instead of 4-9 s on 2 shared cores."""
    flags = [
        ("-m", gguf_path),
        ("-a", "genq"),
        ("--host", "127.0.0.1"),
        ("-c", str(context_length * slots)),
        ("-np", str(slots)),
        ("-t", str(threads)),
    ]
    return ServerSpec(
        name="llama-server",
        backend=Backend.LLAMACPP,
        argv_head=(*_argv(binary, flags=flags), "--metrics"),
        port_flag="--port",
        readiness_path="/health",
        env={"OMP_WAIT_POLICY": "passive"},
        request_defaults={"repeat_penalty": 1.0},
    )


def llama_cpp_python_spec(gguf_path: str, *, context_length: int, threads: int) -> ServerSpec:
    """`python -m llama_cpp.server`: no /health (probe /v1/models), temperature 0.8 and
    repeat_penalty 1.1 by default (always sent explicitly), one request at a time, no usage when
    streaming. By default a new request that needs the model (even GET /v1/models) cuts a running
    stream short with an early [DONE]: interruption is turned off, and the liveness probe uses a
    path that does not wait for the model."""
    flags = [
        ("--model", gguf_path),
        ("--model_alias", "genq"),
        ("--host", "127.0.0.1"),
        ("--n_ctx", str(context_length)),
        ("--n_threads", str(threads)),
        ("--interrupt_requests", "False"),
    ]
    return ServerSpec(
        name="llama_cpp.server",
        backend=Backend.LLAMACPP,
        argv_head=_argv(sys.executable, "-m", "llama_cpp.server", flags=flags),
        port_flag="--port",
        readiness_path="/v1/models",
        liveness_path="/openapi.json",
        request_defaults={"repeat_penalty": 1.0},
        sends_usage_when_streaming=False,
        hides_errors_in_streams=True,
    )


def find_llama_server(explicit: str | None) -> str | None:
    """An explicit path, else `llama-server` on PATH, else None (then llama_cpp.server is used)."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"llama-server binary {explicit!r} is not an executable file")
        return explicit
    return shutil.which("llama-server")


def for_model(settings: WorkerSettings, model: str) -> ServerSpec:
    """The server a worker of these settings runs for `model`: mlx_lm.server, else llama-server if
    there is a binary, else `python -m llama_cpp.server`."""
    route = settings.routes.get(model).backend(settings.backend)
    if settings.backend is Backend.MLX:
        return mlx_spec(
            route.path,
            concurrency=settings.concurrency,
            max_tokens=settings.max_tokens_cap,
            hub_cache=settings.hub_cache,
            prompt_cache_size=settings.prompt_cache_size,
            prompt_cache_bytes=settings.prompt_cache_bytes,
            processes=settings.processes,
        )
    binary = find_llama_server(settings.llama_server_bin)
    if binary is not None:
        return llama_server_spec(
            binary,
            route.path,
            slots=settings.concurrency,
            context_length=route.context_length,
            threads=settings.llama_threads,
        )
    return llama_cpp_python_spec(route.path, context_length=route.context_length, threads=settings.llama_threads)


def log_path(settings: WorkerSettings, model: str) -> str:
    """Where a worker process's server for `model` writes, `{pid}` standing for the worker process's id."""
    return str(settings.log_dir.expanduser() / f"{model}.{settings.backend.value}.{{pid}}.log")
