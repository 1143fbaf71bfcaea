"""`genq models`: which live worker serves and holds which model, with sizes and memory budgets,
as the workers publish them (jobcontract.protocol.placement). Needs only the job contract."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    models = sub.add_parser("models", help="which worker holds which model, and their memory budgets")
    models.add_argument("--json", action="store_true", help="one JSON object per worker")
    models.set_defaults(run=_models)


def _models(args: argparse.Namespace) -> int:
    from jobcontract import protocol
    from jobcontract.connection import connect
    from jobcontract.keys import Keys
    from jobcontract.protocol.placement import ReadModels
    from jobcontract.settings import GenqSettings

    settings = GenqSettings()
    client = connect(settings.redis_url)
    try:
        fleet = protocol.run(client, ReadModels(Keys(settings.namespace)))
    finally:
        client.close()
    if args.json:
        for worker in fleet:
            print(worker.to_json())
        return 0
    if not fleet:
        print("no live worker has published its models")
        return 0
    print(f"{'WORKER':<40} {'BUDGET':>9} {'USED':>9}  MODELS (* loaded, size)")
    for worker in fleet:
        budget = "-" if worker.budget_bytes is None else _gib(worker.budget_bytes)
        models = ", ".join(
            f"{'*' if m in worker.loaded else ''}{m} {_gib(worker.sizes.get(m, 0))}" for m in worker.serves
        )
        print(f"{worker.worker:<40} {budget:>9} {_gib(worker.used_bytes):>9}  {models}")
    return 0


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f}G"
