"""The build stamp (OUT_DIR/genq-tiny.json): seed, builder version and file digests.

Why: every test session and benchmark asks for the tiny model, so a rerun must be a no-op; but a
build with another seed, an older builder, or a file edited or truncated since must be rebuilt
rather than silently served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .architecture import LAYERS
from .files import sha256, write_json

# Bump when anything that changes the output bytes changes: the stamp then no longer matches and the
# next build rewrites the model instead of silently keeping a stale one.
SCRIPT_VERSION = 1

MLX_DIRNAME = "tiny-llama"
GGUF_NAME = "tiny-llama.gguf"
STAMP_NAME = "genq-tiny.json"


def expected_stamp(seed: int, layers: int = LAYERS) -> dict[str, Any]:
    """The stamp fields that must match for a previous build to be reused. `layers` is recorded only
    when it is not the default, so stamps written before it existed still match."""
    fields: dict[str, Any] = {"seed": seed, "script_version": SCRIPT_VERSION}
    return fields | ({"layers": layers} if layers != LAYERS else {})


def _stamped_files(out_dir: Path) -> dict[str, Path]:
    """The files whose digests the stamp records, by their key in it."""
    mlx_dir = out_dir / MLX_DIRNAME
    return {
        "model.safetensors": mlx_dir / "model.safetensors",
        "tokenizer.json": mlx_dir / "tokenizer.json",
        GGUF_NAME: out_dir / GGUF_NAME,
    }


def is_current(out_dir: Path, seed: int, layers: int = LAYERS) -> bool:
    """True when a previous build with the same seed, size and script version is complete and untouched."""
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in expected_stamp(seed, layers).items()):
        return False
    if layers == LAYERS and "layers" in stamp:  # a build of another size
        return False
    digests: dict[str, str] = stamp.get("sha256", {})
    for key, path in _stamped_files(out_dir).items():
        if not path.is_file() or digests.get(key) != sha256(path):
            return False
    return (out_dir / MLX_DIRNAME / "config.json").is_file()


def write_stamp(out_dir: Path, seed: int, vocab_size: int, layers: int = LAYERS) -> None:
    """Record the finished build; written last, so a stamp never vouches for a half-written model."""
    stamp = expected_stamp(seed, layers) | {
        "vocab_size": vocab_size,
        "sha256": {key: sha256(path) for key, path in _stamped_files(out_dir).items()},
    }
    write_json(out_dir / STAMP_NAME, stamp)
