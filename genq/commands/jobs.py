"""`genq submit | result | status | cancel`: the Python client from a shell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def register(sub: Any) -> None:
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
