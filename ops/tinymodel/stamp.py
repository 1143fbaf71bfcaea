"""The build stamp (OUT_DIR/genq-tiny.json): seed, builder version and file digests.

Why: every test session and benchmark asks for the tiny model, so a rerun must be a no-op; but a
build with another seed, an older builder, or a file edited or truncated since must be rebuilt
rather than silently served.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .architecture import TINY, Shape
from .files import sha256, write_json

# Bump when anything that changes the output bytes changes: the stamp then no longer matches and the
# next build rewrites the model instead of silently keeping a stale one.
SCRIPT_VERSION = 1


def mlx_dirname(shape: Shape = TINY) -> str:
    """The transformers / mlx-lm folder of a shape: `tiny-llama`, `small-llama`."""
    return f"{shape.name}-llama"


def gguf_name(shape: Shape = TINY) -> str:
    return f"{mlx_dirname(shape)}.gguf"


def stamp_name(shape: Shape = TINY) -> str:
    return f"genq-{shape.name}.json"


MLX_DIRNAME = mlx_dirname(TINY)
GGUF_NAME = gguf_name(TINY)
STAMP_NAME = stamp_name(TINY)


def expected_stamp(seed: int, shape: Shape = TINY) -> dict[str, Any]:
    """The stamp fields that must match for a previous build to be reused. Another shape's stamp
    records its dimensions too, so editing that shape rebuilds it; the tiny stamp stays as it was."""
    fields: dict[str, Any] = {"seed": seed, "script_version": SCRIPT_VERSION}
    if shape != TINY:
        fields["shape"] = asdict(shape)
    return fields


def _stamped_files(out_dir: Path, shape: Shape) -> dict[str, Path]:
    """The files whose digests the stamp records, by their key in it."""
    mlx_dir = out_dir / mlx_dirname(shape)
    return {
        "model.safetensors": mlx_dir / "model.safetensors",
        "tokenizer.json": mlx_dir / "tokenizer.json",
        gguf_name(shape): out_dir / gguf_name(shape),
    }


def is_current(out_dir: Path, seed: int, shape: Shape = TINY) -> bool:
    """True when a previous build with the same seed, shape and script version is complete and untouched."""
    try:
        stamp = json.loads((out_dir / stamp_name(shape)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in expected_stamp(seed, shape).items()):
        return False
    digests: dict[str, str] = stamp.get("sha256", {})
    for key, path in _stamped_files(out_dir, shape).items():
        if not path.is_file() or digests.get(key) != sha256(path):
            return False
    return (out_dir / mlx_dirname(shape) / "config.json").is_file()


def write_stamp(out_dir: Path, seed: int, vocab_size: int, shape: Shape = TINY) -> None:
    """Record the finished build; written last, so a stamp never vouches for a half-written model."""
    stamp = expected_stamp(seed, shape) | {
        "vocab_size": vocab_size,
        "sha256": {key: sha256(path) for key, path in _stamped_files(out_dir, shape).items()},
    }
    write_json(out_dir / stamp_name(shape), stamp)
