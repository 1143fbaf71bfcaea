"""Helpers of the security and fuzzing tests: a private redis-server that wants a password (an ACL
user, and `requirepass` for the default user), and `genq gateway` subprocesses with API keys, which
are ready once their public OpenAPI spec answers (every other path wants a key)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import redis

from genq.local_redis import LocalRedis
from jobcontract.settings import GenqSettings
from tests.callers import Gateway, start_gateway


@dataclass(frozen=True)
class LockedRedis:
    server: LocalRedis
    user: str
    password: str  # the ACL user's
    default_password: str  # `requirepass`: the default user's

    @property
    def url(self) -> str:
        return f"redis://{self.user}:{self.password}@127.0.0.1:{self.server.port}/0"

    @property
    def secrets(self) -> tuple[str, str]:
        return self.password, self.default_password


def lock(server: LocalRedis, user: str = "genq") -> LockedRedis:
    """Give a running private redis-server an ACL user and a default-user password."""
    locked = LockedRedis(server, user, f"acl-{secrets.token_hex(12)}", f"req-{secrets.token_hex(12)}")
    client = redis.Redis(port=server.port)
    try:
        client.execute_command("ACL", "SETUSER", user, "on", f">{locked.password}", "~*", "&*", "+@all")
        client.config_set("requirepass", locked.default_password)
    finally:
        client.close()
    return locked


def start_gateway_process(
    settings: GenqSettings, log_dir: Path, env: dict[str, str], *, argv: list[str] | None = None
) -> Gateway:
    """`genq gateway` (or `argv`) on a free port with these GENQ_ variables."""
    return start_gateway(settings, log_dir, argv=argv, **env)


# -- tenants --------------------------------------------------------------------------------------------


def tenant_keys_env(keys: list[dict[str, object]], **extra: str) -> dict[str, str]:
    """A gateway's environment with these API key entries (name, tenant, admin, bounds)."""
    import json

    return {"GENQ_GATEWAY_API_KEYS": json.dumps(keys), **extra}


def as_caller(gateway: Gateway, key: str) -> openai.OpenAI:
    """The unmodified openai SDK as one API key, no retries (a refusal shows at once)."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def assert_hidden(foreign: httpx.Response, missing: httpx.Response, foreign_id: str, missing_id: str) -> None:
    """Another tenant's object answers exactly as an id that does not exist: same status, same body
    once the ids are swapped, so an answer tells nothing about whether the id exists."""
    assert foreign.status_code == missing.status_code == 404, (foreign.text, missing.text)
    assert foreign.json() == json.loads(missing.text.replace(missing_id, foreign_id)), (foreign.text, missing.text)
    assert foreign.headers.get("content-type") == missing.headers.get("content-type")
