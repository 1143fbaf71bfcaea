"""A blocking read that another thread can end at once: one connection of its own, whose Redis client
id is known, so `CLIENT UNBLOCK` from any other connection ends its wait.

Why: an idle consumer (jobcontract.consumer) waits in one long XREADGROUP instead of waking every
second to ask again (the idle fleet's Redis load, issue #12), and a worker that stops must not wait
that long for it. The connection is taken from the client's pool for good (its settings, TLS and
Sentinel included) and its socket waits past the longest block, so only a Redis that stopped
answering times it out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

# What a socket waits beyond the block before it calls Redis silent (as jobcontract.connection's).
SOCKET_MARGIN_S = 3.0


class IdleReader:
    def __init__(
        self, client: redis.Redis, longest_block_ms: int, *, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        self.client = client
        self.on_reconnect = on_reconnect
        self.timeout_s = longest_block_ms / 1000 + SOCKET_MARGIN_S
        self._connection: Any = None
        self._client_id: int | None = None  # of the connection as it is now (None: ask after connecting)
        self._lock = threading.Lock()
        self._reading = False

    def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], *, count: int, block_ms: int) -> Any:
        """XREADGROUP ... BLOCK block_ms on this reader's connection, parsed as the client parses it."""
        connection = self._connect()
        args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block_ms, "STREAMS"]
        args += [*streams.keys(), *streams.values()]
        with self._lock:
            self._reading = True
        try:
            connection.send_command(*args)
            return self.client.parse_response(connection, "XREADGROUP")
        except redis.ResponseError:
            raise  # an answer (NOGROUP): the connection is fine
        except BaseException:
            connection.disconnect()  # a reply half read, or none: start afresh next time
            raise
        finally:
            with self._lock:
                self._reading = False

    def unblock(self) -> bool:
        """End a read under way now (it answers as if its block ran out); False when none was."""
        with self._lock:
            if not self._reading or self._client_id is None:
                return False
            client_id = self._client_id
        return bool(self.client.client_unblock(client_id))

    def reading(self) -> bool:
        with self._lock:
            return self._reading

    def close(self) -> None:
        if self._connection is not None:
            self._connection.disconnect()

    def _connect(self) -> Any:
        if self._connection is None:
            connection = self.client.connection_pool.get_connection()
            connection.socket_timeout = self.timeout_s  # for every reconnection too
            connection.register_connect_callback(self._forget_id)
            self._connection = connection
            connection.update_current_socket_timeout(self.timeout_s)
        connection = self._connection
        connection.connect()  # a no-op while connected
        if self._client_id is None:
            connection.send_command("CLIENT", "ID")
            client_id = int(connection.read_response())
            with self._lock:
                self._client_id = client_id
        return connection

    def _forget_id(self, _connection: Any) -> None:
        with self._lock:
            self._client_id = None
        if self.on_reconnect is not None:
            self.on_reconnect()
