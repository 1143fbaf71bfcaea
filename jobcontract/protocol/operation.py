"""An operation is one atomic Redis state change: its script, the keys it touches, its arguments and
the reading of its reply, written once and free of I/O. Stores, the broker and the gateway are
executors: `run` (sync), `run_async` (redis.asyncio) or `send` into a pipeline whose reply they read
with `op.parse`. The split follows httpx's BaseClient: all logic once, only the I/O twice.

An operation is a frozen dataclass whose fields are named; `keys()` and `args()` build KEYS and ARGV
from them in the order its `.lua` file documents, so no call site counts positions by hand.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

import redis
import redis.asyncio as aioredis

from jobcontract import scripts

R = TypeVar("R")

PACKAGE = "jobcontract.protocol"


class Operation(Generic[R]):
    """Subclasses set SCRIPT (a file of this package) and build keys, args and the reply's meaning."""

    SCRIPT: ClassVar[str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def args(self) -> list[Any]:
        raise NotImplementedError

    def parse(self, reply: Any) -> R:
        raise NotImplementedError


def source(op: type[Operation[Any]] | Operation[Any]) -> str:
    """The operation's Lua, includes expanded (what EVAL runs)."""
    return scripts.source(PACKAGE, op.SCRIPT)


def run(client: redis.Redis, op: Operation[R]) -> R:
    return op.parse(scripts.registered(client, PACKAGE, op.SCRIPT)(keys=op.keys(), args=op.args()))


def send(pipe: Any, client: redis.Redis, op: Operation[Any]) -> None:
    """Queue the operation on a pipeline of `client` (its reply is read with `op.parse` after execute)."""
    scripts.registered(client, PACKAGE, op.SCRIPT)(keys=op.keys(), args=op.args(), client=pipe)


async def run_async(client: aioredis.Redis, op: Operation[R]) -> R:
    return op.parse(await scripts.registered(client, PACKAGE, op.SCRIPT)(keys=op.keys(), args=op.args()))


async def send_async(pipe: Any, client: aioredis.Redis, op: Operation[Any]) -> None:
    await scripts.registered(client, PACKAGE, op.SCRIPT)(keys=op.keys(), args=op.args(), client=pipe)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
