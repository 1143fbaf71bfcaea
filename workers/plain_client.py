"""One plain (non-streamed) completion: the whole answer in one response, for jobs nobody streams.

Reading a streamed answer costs the worker ~0.25 ms of CPU per token (one SSE event parsed per
token) and the server more work per job; a job nobody watches token by token needs none of it.
What streaming gave for free is kept another way:
- a frozen server: the server supervisor's liveness probe keeps probing it while the answer is
  awaited; a server silent longer than a token may take (`stalled`) fails the attempt as a timeout,
  and a restart by the supervisor closes the connection (a crash); both are retried or rerouted.
  The attempt's own bound (`plain_budget_s`, capped by the deadline) is the backstop;
- cancellation: the socket is polled (`select`) every POLL_S, so a cancelled job closes its request
  within that time instead of waiting for the answer (the server only notices when it writes the
  answer: llama-server finishes that generation in its slot, a streamed request stops sooner);
- a connection the server keeps alive (llama-server answers plain completions in HTTP/1.1) is
  reused by the next job of the same thread; mlx_lm.server (HTTP/1.0) closes it every time.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jobcontract.models import AttemptOutcome

POLL_S = 0.05  # how soon a cancel closes a running plain request


class PlainFailure(Exception):
    """Raised with what the caller turns into a BackendError (kept apart to avoid an import cycle)."""

    def __init__(self, outcome: AttemptOutcome, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retryable = retryable


class PlainCancelled(Exception):
    pass


@dataclass
class PlainAnswer:
    status: int
    body: bytes


def plain_budget_s(first_token_s: float, between_tokens_s: float, max_tokens: int) -> float:
    """How long a plain completion may take: the first-token timeout plus the per-token budget for
    every token asked for. The caller caps it by the job's deadline."""
    return first_token_s + between_tokens_s * max_tokens


class _Connections(threading.local):
    """One kept-alive connection per worker thread (and server address)."""

    def __init__(self) -> None:
        self.by_address: dict[tuple[str, int], http.client.HTTPConnection] = {}


_connections = _Connections()


def post_json(
    url: str,
    payload: dict[str, Any],
    *,
    connect_timeout_s: float,
    until: float,
    cancelled: threading.Event | None,
    deadline: float,
    stalled: Callable[[], bool] | None = None,
) -> PlainAnswer:
    """POST `payload` and wait for the whole answer until the monotonic instant `until`."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    body = json.dumps(payload).encode()
    conn = _kept(address) or http.client.HTTPConnection(*address, timeout=connect_timeout_s)
    try:
        return _exchange(conn, parts.path, body, until=until, cancelled=cancelled, deadline=deadline, stalled=stalled)
    except (OSError, http.client.HTTPException) as error:  # refused, reset, cut short (IncompleteRead)
        conn.close()
        if isinstance(error, ConnectionRefusedError):  # nobody listening: the server is down, not hurt by this job
            raise PlainFailure(AttemptOutcome.UNAVAILABLE, f"{error!r}", retryable=True) from error
        raise PlainFailure(AttemptOutcome.CONNECTION_ERROR, f"{error!r}", retryable=True) from error
    except BaseException:
        conn.close()
        raise


def _kept(address: tuple[str, int]) -> http.client.HTTPConnection | None:
    """This thread's kept-alive connection, unless the server has closed it while it was idle (an
    idle socket that reads as ready has only its end-of-file to say)."""
    conn = _connections.by_address.pop(address, None)
    if conn is not None and (conn.sock is None or select.select([conn.sock], [], [], 0)[0]):
        conn.close()
        return None
    return conn


def _exchange(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes,
    *,
    until: float,
    cancelled: threading.Event | None,
    deadline: float,
    stalled: Callable[[], bool] | None,
) -> PlainAnswer:
    if conn.sock is None:
        conn.connect()
    assert conn.sock is not None
    conn.sock.settimeout(5.0)  # sending the request; the answer is waited for with select below
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    sock = conn.sock
    assert sock is not None
    while not select.select([sock], [], [], max(0.0, min(POLL_S, until - time.monotonic())))[0]:
        if cancelled is not None and cancelled.is_set():
            raise PlainCancelled()
        now = time.monotonic()
        if now >= deadline:
            raise PlainFailure(AttemptOutcome.TIMEOUT, "job deadline passed while generating", retryable=False)
        if now >= until:
            raise PlainFailure(AttemptOutcome.TIMEOUT, "no answer within the attempt's budget", retryable=True)
        if stalled is not None and stalled():
            raise PlainFailure(AttemptOutcome.TIMEOUT, "the server stopped answering its probe", retryable=True)
    # The answer has begun; the whole of it is written at once, so reads are short.
    sock.settimeout(max(1.0, min(30.0, until - time.monotonic())))
    response = conn.getresponse()
    data = response.read()
    if response.will_close:
        conn.close()
    else:
        _keep(conn)
    return PlainAnswer(status=response.status, body=data)


def _keep(conn: http.client.HTTPConnection) -> None:
    """Keep it for this thread's next request; one kept at a time, so the connection to a server
    since restarted on another port is closed, not leaked."""
    for old in _connections.by_address.values():
        old.close()
    _connections.by_address = {(conn.host, conn.port): conn}
