"""A worker's own settings, on top of the shared ones (`GENQ_` environment variables)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field

from jobcontract.models import Backend
from jobcontract.scheduling import DEFAULT_MAX_SWAP_WAIT_S, DEFAULT_STEAL_AFTER_S
from jobcontract.settings import GenqSettings
from workers.models.sizes import GIB, default_budget_bytes


class WorkerSettings(GenqSettings):
    model: str = Field(default="tiny", description="The logical model this worker serves (from the routes).")
    # GENQ_SERVE_MODELS, not GENQ_MODELS: docker-compose's .env already names the host's models folder so.
    serve_models: str | None = Field(
        default=None,
        description="`genq worker --models`: serve several models, loaded on demand within the memory budget: "
        "`a,b,c`, or `all` (every model of the routes this backend can serve). Unset: the one `model`, always loaded.",
    )
    memory_budget_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory the loaded models of all processes may take together (GiB); by default "
        "0.75 of physical memory (see workers.models.sizes for why). Split evenly between processes.",
    )
    model_keep_alive_s: float = Field(
        default=300.0, ge=0, description="A loaded model with no job for this long is unloaded (with --models)."
    )
    max_swap_wait_s: float = Field(
        default=DEFAULT_MAX_SWAP_WAIT_S,
        ge=0,
        description="With --models: a job for a model this worker has not loaded is taken at once only when "
        "the worker is idle and no other live worker has the model loaded; otherwise once it waited this long "
        "(jobs of one model are grouped; a swap happens when it pays; nothing waits for ever).",
    )
    backend: Backend = Backend.MLX
    processes: int = Field(default=1, ge=1, le=64, description="Worker processes, each with its own server.")
    concurrency: int = Field(
        default=16, ge=1, le=512, description="Requests in flight per process; the server batches them."
    )
    llama_server_bin: str | None = Field(
        default=None,
        description="Path of a llama-server binary; else llama-server on PATH; else python -m llama_cpp.server.",
    )
    llama_threads: int = Field(default=2, ge=1)
    prompt_cache_size: int | None = Field(
        default=None,
        ge=0,
        description="mlx_lm.server --prompt-cache-size: KV caches of recent prompts it keeps for reuse; "
        "default max(10, 2 x concurrency) (workers.servers.specs.default_prompt_cache_size).",
    )
    prompt_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="mlx_lm.server --prompt-cache-bytes: a cap on the KV its prompt cache holds (0: no cap); "
        "default half the host's memory over the worker's processes (specs.default_prompt_cache_bytes).",
    )
    server_start_timeout_s: float = Field(default=180.0, gt=0)
    server_hang_timeout_s: float = Field(
        default=2.0, gt=0, description="A server silent this long on its probe is restarted."
    )
    liveness_ttl_s: float = Field(
        default=10.0, ge=2.0, description="A worker not vouched for this long has its jobs handed back."
    )
    rescue_after_s: float = Field(
        default=5.0,
        ge=0,
        description="A job waiting this long in a pool with no live worker moves to the next backend.",
    )
    prefix_affinity: bool = Field(
        default=True,
        description="Take the prompt-prefix shards this worker owns first (its server's prompt cache holds "
        "them); other workers' shards only for the room left (jobcontract.scheduling).",
    )
    prefix_steal_after_s: float = Field(
        default=DEFAULT_STEAL_AFTER_S,
        ge=0,
        description="How long a job waits for the worker owning its prefix before another worker with room takes it.",
    )
    circuit_threshold: int = Field(default=3, ge=1, description="Failures in a row that open a pool's circuit.")
    circuit_cool_down_s: float = Field(default=10.0, gt=0, description="How long an open circuit keeps jobs away.")
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    metrics_port: int | None = Field(default=None, description="Serve /metrics for all processes here.")
    host: str = Field(default_factory=socket.gethostname)
    log_dir: Path = Field(default=Path("~/.cache/genq/logs").expanduser())
    hub_cache: Path = Field(default=Path("~/.cache/huggingface/hub").expanduser())

    @property
    def multi_model(self) -> bool:
        return self.serve_models is not None

    def served_models(self) -> list[str]:
        """The models this worker serves: `serve_models` (`all` read from the routes) or the one `model`.
        A model the routes do not have, or have for another backend only, is refused at start."""
        if self.serve_models is None:
            return [self.model]
        if self.serve_models.strip() == "all":
            return [m.name for m in self.routes.models if self.backend in m.order]
        names = list(dict.fromkeys(n.strip() for n in self.serve_models.split(",") if n.strip()))
        if not names:
            raise ValueError("--models names no model")
        for name in names:
            if self.backend not in self.routes.get(name).order:
                raise ValueError(f"model {name!r} has no {self.backend.value} route")
        return names

    def budget_bytes_per_process(self) -> int:
        """Each process loads its own servers, so each gets an equal share of the budget."""
        total = default_budget_bytes() if self.memory_budget_gb is None else int(self.memory_budget_gb * GIB)
        return total // self.processes
