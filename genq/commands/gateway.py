"""`genq gateway`: the OpenAI-compatible HTTP gateway on uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("genq.gateway")


def register(sub: Any) -> None:
    gateway = sub.add_parser("gateway", help="serve the OpenAI-compatible HTTP gateway")
    gateway.add_argument("--host", help="GENQ_GATEWAY_HOST (loopback unless API keys are configured)")
    gateway.add_argument("--port", type=int, help="GENQ_GATEWAY_PORT")
    gateway.set_defaults(run=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    from jobcontract.connection import redact
    from producer.gateway.app import create_app
    from producer.gateway.server import serve
    from producer.gateway.settings import GatewaySettings, is_loopback

    given = {"gateway_host": args.host, "gateway_port": args.port}
    settings = GatewaySettings(**{k: v for k, v in given.items() if v is not None})
    if settings.loopback_only:
        if not is_loopback(settings.gateway_host):
            print(
                f"genq gateway: refusing to listen on {settings.gateway_host} without API keys; "
                "set GENQ_GATEWAY_API_KEYS or listen on 127.0.0.1",
                file=sys.stderr,
            )
            return 2
        log.warning(
            "no API keys configured: any program on this host may call the gateway, so it serves loopback only "
            "(set GENQ_GATEWAY_API_KEYS or GENQ_GATEWAY_API_KEYS_FILE to serve other hosts)"
        )
    else:  # names only: a key itself is never logged
        for key in settings.key_ring.keys:
            log.info(
                "API key %s: rate %s, at most %d unfinished jobs and %d unfinished batches; tenant %s%s",
                key.name,
                key.rate_text,
                key.max_queued,
                key.max_batches,
                key.tenant,
                " (admin: sees every tenant's work)" if key.admin else "",
            )
    log.info(
        "genq gateway on http://%s:%d (OpenAPI at /docs), redis %s",
        settings.gateway_host,
        settings.gateway_port,
        redact(settings.redis_url),
    )
    serve(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        grace_s=settings.gateway_shutdown_grace_s,
        access_log=settings.gateway_access_log,
    )
    return 0
