"""The `genq` command. Each subcommand imports only its own side: a caller's machine needs no
worker dependencies (mlx, servers) and a worker's none of the gateway's."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence


def _worker(args: argparse.Namespace) -> int:
    from workers.settings import WorkerSettings
    from workers.supervisor import WorkerPool

    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "backend": args.backend,
            "processes": args.processes,
            "concurrency": args.concurrency,
            "metrics_port": args.metrics_port,
            "llama_server_bin": args.llama_server,
        }.items()
        if v is not None
    }
    return WorkerPool(WorkerSettings(**overrides)).run()


def _submit(args: argparse.Namespace) -> int:
    from producer.client import Client

    request: dict[str, object] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.chat:
        request["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        request["prompt"] = args.prompt
    with Client() as client:
        job_id = client.submit(request)
        if not args.wait:
            print(job_id)
            return 0
        print(client.result(job_id, timeout=args.timeout).model_dump_json(indent=2))
    return 0


def _job_command(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from producer.client import Client

        with Client() as client:
            if action == "result":
                print(client.result(args.job_id, timeout=args.timeout).model_dump_json(indent=2))
            elif action == "status":
                print(client.status(args.job_id).model_dump_json(indent=2))
            else:
                print(json.dumps({"job_id": args.job_id, "state": client.cancel(args.job_id).value}))
        return 0

    return run


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


def quiet_libraries() -> None:
    """One line per request from httpx would drown what matters."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genq", description="LLM generation jobs through Redis.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the tiny model end to end on a private Redis and worker")
    demo.add_argument("--prompts", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.set_defaults(run=_demo)

    worker = sub.add_parser("worker", help="run worker processes that each own a backend server")
    worker.add_argument("--model")
    worker.add_argument("--backend", choices=["mlx", "llamacpp"])
    worker.add_argument("--processes", type=int)
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--metrics-port", type=int)
    worker.add_argument("--llama-server", help="path of a llama-server binary")
    worker.set_defaults(run=_worker)

    submit = sub.add_parser("submit", help="queue one prompt")
    submit.add_argument("prompt")
    submit.add_argument("--model", default="tiny")
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    submit.add_argument("--wait", action="store_true", help="wait for and print the result")
    submit.add_argument("--timeout", type=float, default=600.0)
    submit.set_defaults(run=_submit)

    for action in ("result", "status", "cancel"):
        command = sub.add_parser(action, help=f"{action} of a job")
        command.add_argument("job_id")
        command.add_argument("--timeout", type=float, default=600.0)
        command.set_defaults(run=_job_command(action))

    tiny = sub.add_parser("tiny-model", help="build the tiny random-weight model and its GGUF twin")
    tiny.add_argument("out", nargs="?", default="~/.cache/genq/models")
    tiny.set_defaults(run=_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_libraries()
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        code = 130
    except Exception as error:  # one clear line for the operator, the traceback with -v
        if args.verbose:
            raise
        from pydantic import ValidationError

        kind = "invalid request" if isinstance(error, ValidationError) else type(error).__name__
        print(f"genq: {kind}: {error}", file=sys.stderr)
        code = 2 if isinstance(error, ValidationError) else 1
    sys.exit(code)
