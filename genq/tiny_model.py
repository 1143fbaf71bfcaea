"""Find and run ops/build_tiny_model.py, the tiny random-weight model builder, from a source checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUILDER = Path(__file__).resolve().parents[1] / "ops" / "build_tiny_model.py"


def ensure_tiny_model(models_dir: Path, shape: str = "tiny", *, seed: int = 0) -> tuple[Path, Path]:
    """Build (or reuse) the tiny model and its GGUF twin in models_dir; returns (mlx folder, gguf).
    `shape` "small" gives the builder's larger model instead (same tokenizer, 4,096 positions), which
    lives beside the tiny one; another `seed` another model of the same shape (several models for a
    multi-model worker)."""
    if not BUILDER.exists():
        raise FileNotFoundError(f"{BUILDER} not found: the tiny model is built from a genq source checkout")
    spec = importlib.util.spec_from_file_location("genq_build_tiny_model", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mlx_folder, gguf = module.build(models_dir, seed=seed, shape=module.SHAPES[shape])
    return Path(mlx_folder), Path(gguf)
