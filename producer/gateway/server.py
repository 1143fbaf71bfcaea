"""uvicorn for the gateway, with a shutdown bounded by `GENQ_GATEWAY_SHUTDOWN_GRACE_S`: see
producer/gateway/draining.py for why the waiters are answered before anything else stops."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from producer.gateway.services import Services


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # The waiters are told in the same tick the listeners close (no await in between), so no
        # request starts a wait after the drain began.
        services: Services | None = getattr(self.app.state, "services", None)
        if services is not None:
            services.drain.start()
        await super().shutdown(sockets)


def serve(app: FastAPI, *, host: str, port: int, grace_s: float, access_log: bool = False) -> None:
    """uvicorn.run, with the waiters drained at once and any other request cut off after `grace_s`.

    `loop="auto"` and `http="auto"` take uvloop and httptools when installed (the gateway extra
    brings them): uvicorn's pure-Python parser and the asyncio loop were about a tenth of the CPU per job.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=grace_s,  # type: ignore[arg-type]  # uvicorn takes a float (it sleeps on it)
    )
    _DrainingServer(config, app).run()
