"""Model routes: which backends serve each logical model, in which order, with which timeouts.

One TOML file, validated here, read by callers (to refuse unknown models at the door) and by
workers (to find the weights they serve and the policy for moving a job between pools).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobcontract.models import Backend, ModelName
from jobcontract.prefix import PREFIX_CHARS


def backend_for_path(path: str) -> Backend:
    """A `.gguf` file is llama.cpp's; a folder (or hub repo id) of safetensors is MLX's."""
    return Backend.LLAMACPP if path.lower().endswith(".gguf") else Backend.MLX


class BackendRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="MLX model folder or repo; a .gguf file for llama.cpp.")
    kind: Backend | None = Field(default=None, description="Inferred from the path when left out.")
    first_token_timeout_s: float = Field(default=30.0, gt=0, description="Per attempt: until the first token.")
    token_timeout_s: float = Field(default=30.0, gt=0, description="Per attempt: the longest gap between tokens.")
    max_attempts: int = Field(default=2, ge=1, le=20, description="Tries on this pool before rerouting.")
    retry_backoff_s: float = Field(default=0.05, ge=0, le=60)
    context_length: int = Field(default=4096, ge=16)

    @model_validator(mode="after")
    def _infer_kind(self) -> Self:
        if self.kind is None:
            self.kind = backend_for_path(self.path)
        return self

    @property
    def backend(self) -> Backend:
        assert self.kind is not None
        return self.kind


class ModelRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ModelName
    backends: list[BackendRoute] = Field(min_length=1)
    prefix_chars: int = Field(
        default=PREFIX_CHARS,
        ge=0,
        le=1_000_000,
        description="Leading characters of a prompt (or of a chat's canonical rendering) that name its prefix "
        "for cache-aware placement (jobcontract.prefix); 0: none, unless a request names a prompt_cache_key.",
    )

    @model_validator(mode="after")
    def _one_route_per_backend(self) -> Self:
        kinds = [b.backend for b in self.backends]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"model {self.name!r} lists a backend twice: {[k.value for k in kinds]}")
        return self

    @property
    def order(self) -> tuple[Backend, ...]:
        return tuple(b.backend for b in self.backends)

    def backend(self, kind: Backend) -> BackendRoute:
        for route in self.backends:
            if route.backend is kind:
                return route
        raise KeyError(f"model {self.name!r} has no {kind.value} route")

    def next_after(self, kind: Backend) -> Backend | None:
        order = self.order
        index = order.index(kind)
        return order[index + 1] if index + 1 < len(order) else None


class Routes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelRoute] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"a model name is listed twice: {names}")
        return self

    def get(self, name: str) -> ModelRoute:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"unknown model {name!r}")

    def allowed_backends(self) -> dict[str, tuple[str, ...]]:
        return {m.name: tuple(b.value for b in m.order) for m in self.models}

    @classmethod
    def from_file(cls, path: Path) -> Routes:
        """Relative model paths are taken from the routes file's own folder, `~` is expanded."""
        with path.open("rb") as handle:
            routes = cls.model_validate(tomllib.load(handle))
        base = path.resolve().parent
        for model in routes.models:
            for backend in model.backends:
                backend.path = _resolve(backend.path, base)
        return routes

    @classmethod
    def embedded(cls, models_dir: Path) -> Routes:
        """The tiny model built by ops/build_tiny_model.py, on both backends."""
        return cls(
            models=[
                ModelRoute(
                    name="tiny",
                    backends=[
                        BackendRoute(
                            path=str(models_dir / "tiny-llama"),
                            first_token_timeout_s=5.0,
                            token_timeout_s=5.0,
                            context_length=512,
                        ),
                        BackendRoute(
                            path=str(models_dir / "tiny-llama.gguf"),
                            first_token_timeout_s=10.0,
                            token_timeout_s=10.0,
                            context_length=512,
                        ),
                    ],
                )
            ]
        )


def _resolve(path: str, base: Path) -> str:
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = base / expanded
    # A relative name that is not on disk is kept as written: it may be a hub repo id.
    return str(candidate) if candidate.exists() or path.startswith(".") else path
