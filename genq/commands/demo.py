"""`genq demo` and `genq tiny-model`: try genq on embedded defaults."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the tiny model end to end on a private Redis and worker")
    demo.add_argument("--prompts", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.set_defaults(run=_demo)
    tiny = sub.add_parser("tiny-model", help="build the tiny random-weight model and its GGUF twin")
    tiny.add_argument("out", nargs="?", default="~/.cache/genq/models")
    tiny.set_defaults(run=_tiny_model)


def _demo(args: argparse.Namespace) -> int:
    from genq.demo import run_demo

    return run_demo(prompts=args.prompts, max_tokens=args.max_tokens)


def _tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from genq.tiny_model import ensure_tiny_model

    folder, gguf = ensure_tiny_model(Path(args.out).expanduser())
    print(folder)
    print(gguf)
    return 0
