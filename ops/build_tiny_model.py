#!/usr/bin/env python3
"""Build a tiny random-weight llama model and its GGUF twin, offline, deterministically, in seconds.

Why this exists: nothing can be downloaded from a model hub on the machines that run genq's tests and
benchmarks, yet the mlx-lm and llama.cpp workers need a real model to serve. This script makes one from
nothing: a byte-level BPE tokenizer trained on a small built-in English corpus and random llama weights
drawn from numpy with a fixed seed. It writes

* ``OUT_DIR/tiny-llama/``   a transformers / mlx-lm loadable folder (config, safetensors, tokenizer files),
* ``OUT_DIR/tiny-llama.gguf`` the same weights and tokenizer for llama.cpp, written with the ``gguf``
  package (llama.cpp's own converter imports torch, which we do not want to install),
* ``OUT_DIR/genq-tiny.json``  a stamp (seed, script version, file digests) that makes reruns a no-op.

Both backends see bit-identical float32 weights, so greedy (temperature 0) generation from mlx-lm and
llama.cpp agrees token for token, which is what lets tests compare the two workers.

Usage: ``python ops/build_tiny_model.py OUT_DIR [--seed 0] [--force] [--shape tiny|small]``. Other code
can load this file by path and call :func:`build`. ``--shape small`` builds a larger model of the same
tokenizer beside the tiny one (``small-llama/``, ``small-llama.gguf``, ``genq-small.json``), for the
benchmarks where prefill must cost something (ops/tinymodel/architecture.py says its size); the tiny
model, its files and its stamp are the same whether or not it exists. The work is done by the modules
of ``ops/tinymodel/`` (one job each, listed in its ``__init__.py``); this file is their command line
and the one place that loads them.

Needs: numpy, safetensors, tokenizers, gguf (the ``tinymodel`` extra). No torch, no network.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

_PACKAGE_DIR = Path(__file__).resolve().parent / "tinymodel"
_PACKAGE_NAME = "genq_ops_tinymodel"


def _load_package() -> ModuleType:
    """Import ops/tinymodel/ by path, under a name no installed package uses.

    ops/ is not a package and is on sys.path only when this file runs as a script; genq/tiny_model.py
    and the tests load this file by path. Loading the folder by path works in both cases and leaves
    sys.path alone. A package of the same name from another checkout is replaced, not reused.
    """
    loaded = sys.modules.get(_PACKAGE_NAME)
    if loaded is not None and list(getattr(loaded, "__path__", [])) == [str(_PACKAGE_DIR)]:
        return loaded
    for name in [n for n in sys.modules if n == _PACKAGE_NAME or n.startswith(_PACKAGE_NAME + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        _PACKAGE_NAME, _PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(_PACKAGE_DIR)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE_NAME] = package
    spec.loader.exec_module(package)
    return package


_load_package()
_build = importlib.import_module(f"{_PACKAGE_NAME}.build")
_stamp = importlib.import_module(f"{_PACKAGE_NAME}.stamp")
_tokenizer = importlib.import_module(f"{_PACKAGE_NAME}.tokenizer")
_weights = importlib.import_module(f"{_PACKAGE_NAME}.weights")
_gguf_file = importlib.import_module(f"{_PACKAGE_NAME}.gguf_file")
_architecture = importlib.import_module(f"{_PACKAGE_NAME}.architecture")

# What callers of this file used before it was split: keep them reachable here.
build = _build.build
train_tokenizer = _tokenizer.train_tokenizer
make_weights = _weights.make_weights
write_gguf = _gguf_file.write_gguf
SCRIPT_VERSION: int = _stamp.SCRIPT_VERSION
MLX_DIRNAME: str = _stamp.MLX_DIRNAME
GGUF_NAME: str = _stamp.GGUF_NAME
STAMP_NAME: str = _stamp.STAMP_NAME
SHAPES = _architecture.SHAPES  # name -> Shape: "tiny" (the default), "small"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build into OUT_DIR and print where the two models are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, help="folder to write tiny-llama/ and tiny-llama.gguf into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="tiny", help="which model: tiny (default) or small (longer prompts)"
    )
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    t0 = time.perf_counter()
    reused = not args.force and _stamp.is_current(args.out_dir, args.seed, shape)
    mlx_dir, gguf_path = build(args.out_dir, seed=args.seed, force=args.force, shape=shape)
    verb = "kept" if reused else "built"
    print(f"{verb} {mlx_dir} and {gguf_path} (seed {args.seed}) in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
