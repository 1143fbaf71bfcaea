"""`genq dlq list | show | replay | purge`: look at jobs given up after bounded attempts, and run
them again or drop them. Needs only the job contract: an operator's laptop can run it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobcontract.deadletters import DeadLetters


def register(sub: Any) -> None:
    dlq = sub.add_parser("dlq", help="dead letters: jobs given up after bounded attempts")
    actions = dlq.add_subparsers(dest="dlq_action", required=True)
    listing = actions.add_parser("list", help="dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(run=_list)
    show = actions.add_parser("show", help="one dead letter in full, with its job's record")
    show.add_argument("ref", help="dead-letter id or job id")
    show.set_defaults(run=_show)
    replay = actions.add_parser("replay", help="run dead-lettered jobs again (same job ids)")
    replay.add_argument("refs", nargs="*", help="dead-letter ids or job ids")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(run=_replay)
    purge = actions.add_parser("purge", help="delete dead letters for good")
    purge.add_argument("refs", nargs="*", help="dead-letter ids or job ids")
    purge.add_argument("--all", action="store_true", help="delete every dead letter")
    purge.set_defaults(run=_purge)


def _open() -> DeadLetters:
    from jobcontract.connection import connect
    from jobcontract.deadletters import DeadLetters
    from jobcontract.keys import Keys
    from jobcontract.settings import GenqSettings

    settings = GenqSettings()
    return DeadLetters(
        connect(settings.redis_url),
        Keys(settings.namespace),
        default_timeout_s=settings.default_timeout_s,
        result_ttl_s=settings.result_ttl_s,
    )


def _list(args: argparse.Namespace) -> int:
    letters = _open()
    entries = letters.entries(limit=args.limit)
    for letter in entries:
        summary = letter.summary()
        if args.json:
            print(json.dumps(summary))
        else:
            reason = summary["reason"] if len(summary["reason"]) <= 80 else summary["reason"][:77] + "..."
            print(f"{summary['id']:<18} {summary['dead_at'][:19]}  {summary['job_id'] or '-':<32}  {summary['queue']}")
            print(f"    {reason}")
    if not args.json:
        total = letters.count()
        print(f"{total} dead letter(s)" + (f", {len(entries)} shown" if total > len(entries) else ""))
    return 0


def _show(args: argparse.Namespace) -> int:
    letters = _open()
    letter = letters.get(args.ref)
    body = letter.details()
    status = letters.status(letter)
    body["job"] = None if status is None else status.model_dump(mode="json")
    print(json.dumps(body, indent=2, default=str))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from jobcontract.deadletters import ReplayRefused

    if bool(args.refs) == bool(args.all):
        raise SystemExit("genq dlq replay: give dead-letter ids or job ids, or --all")
    letters = _open()
    if args.all:
        replayed, refused = letters.replay_all()
    else:
        replayed, refused = [], []
        for ref in args.refs:
            try:
                replayed.append(letters.replay(ref))
            except (ReplayRefused, KeyError) as error:
                refused.append((ref, str(error)))
    for done in replayed:
        print(json.dumps({"job_id": done.job_id, "queue": done.queue, "was": done.previous_state}))
    for ref, why in refused:
        print(json.dumps({"ref": ref, "refused": why}))
    return 1 if refused else 0


def _purge(args: argparse.Namespace) -> int:
    if bool(args.refs) == bool(args.all):
        raise SystemExit("genq dlq purge: give dead-letter ids or job ids, or --all")
    purged = _open().purge(None if args.all else list(args.refs))
    print(json.dumps({"purged": purged}))
    return 0
