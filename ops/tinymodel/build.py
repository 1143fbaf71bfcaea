"""Build (or reuse) the tiny model: both halves written into a scratch folder, moved into place, stamped.

The one entry point other code calls (through ops/build_tiny_model.py). Writing into a scratch folder
next to the targets and stamping last means a crash never leaves a half model that a stamp claims
is whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .architecture import TINY, Shape
from .gguf_file import write_gguf
from .hf_folder import write_hf_folder
from .stamp import gguf_name, is_current, mlx_dirname, stamp_name, write_stamp
from .tokenizer import train_tokenizer
from .weights import make_weights, suppressed_ids


def build(out_dir: Path, seed: int = 0, force: bool = False, shape: Shape = TINY) -> tuple[Path, Path]:
    """Build (or reuse) the model of ``shape`` (the tiny one unless told) under ``out_dir`` and return
    ``(mlx_folder, gguf_path)``.

    Idempotent: an existing build with a matching stamp is kept unless ``force``. A new build is written
    into a scratch folder next to the targets and moved into place, so a crash never leaves a half
    model that a stamp claims is whole.
    """
    out_dir = Path(out_dir)
    mlx_dir, gguf_path = out_dir / mlx_dirname(shape), out_dir / gguf_name(shape)
    if not force and is_current(out_dir, seed, shape):
        return mlx_dir, gguf_path

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=out_dir))
    try:
        tok = train_tokenizer()
        vocab_size = tok.get_vocab_size()
        weights = make_weights(seed, vocab_size, suppressed_ids(tok), shape)

        new_mlx = scratch / mlx_dirname(shape)
        new_mlx.mkdir()
        write_hf_folder(new_mlx, weights, tok, shape)
        new_gguf = scratch / gguf_name(shape)
        write_gguf(new_gguf, weights, tok, shape)
        # safetensors writes its file 0600 (via a temp file) and mkdtemp is 0700: make the model
        # readable by the worker processes whatever user they run as.
        for f in [*new_mlx.iterdir(), new_gguf]:
            f.chmod(0o644)
        new_mlx.chmod(0o755)

        (out_dir / stamp_name(shape)).unlink(missing_ok=True)
        if mlx_dir.exists():
            shutil.rmtree(mlx_dir)
        new_mlx.rename(mlx_dir)
        os.replace(new_gguf, gguf_path)
        write_stamp(out_dir, seed, vocab_size, shape)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return mlx_dir, gguf_path
