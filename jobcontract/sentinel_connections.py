"""Connections to a Sentinel-managed master that ask the sentinels again on every reconnect.

redis-py's SentinelManagedConnection asks the sentinels only when a connection is taken from the
pool. When a command's own retry reconnects (after "Connection closed by server", a timeout, or
READONLY from a demoted master), it goes through `connect_check_health` straight to the last
address (redis-py issues #3874, #3560; still so in 8.x). So a request under way when the master
fails spends all its retries on the old address, however long it is willing to wait, and fails
although the sentinels have named a new master; worse, the old master, restarted empty, calls
itself a master for seconds before the sentinels demote it, and a retried write or read lands
there (a job admitted into a dataset about to be wiped, a job reported unknown). These classes
send that reconnect through the sentinels, as a connection from the pool would.
"""

from __future__ import annotations

from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedConnection


class MasterConnection(SentinelManagedConnection):
    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # connect() asks the sentinels, then comes back here with retry_socket_connect=False.
        if retry_socket_connect and not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
            return
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class MasterSSLConnection(MasterConnection, SSLConnection):
    pass


class AsyncMasterConnection(AsyncSentinelManagedConnection):
    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if retry_socket_connect and not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class AsyncMasterSSLConnection(AsyncMasterConnection, AsyncSSLConnection):
    pass
