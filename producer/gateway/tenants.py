"""Whose a job is, and idempotency keys per tenant.

A job queued through the gateway carries its tenant in its record (`tenant` in the job hash), written
by the admission script itself (jobcontract.protocol.jobs.Submit's `owner`), so a job never exists
without its owner and every read by id can check it; an earlier job an idempotency key answers with
gets the tenant if it had none, never another one. A job of a gateway batch has no `tenant` of its
own: it is its batch's. A job made outside the gateway (the Python client, `genq batch run`) belongs
to no tenant, and only callers who see all (an admin key, or a gateway without keys) see it. Another
tenant's job answers exactly as an id that does not exist: the same UnknownJob, so no answer tells
whether an id exists.

An Idempotency-Key is the tenant's own: it reaches the store as `@TENANT:` and the SHA-256 of the key
(`@` cannot start a batch id, so it never meets a batch line's `BATCH:CUSTOM_ID` key, and the digest
keeps it within the 256 characters a key may have), so two tenants using the same key get two jobs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from jobcontract.jobs import UnknownJob
from jobcontract.keys import Keys
from producer.gateway.api_keys import Caller

log = logging.getLogger(__name__)


def scoped_key(caller: Caller, key: str | None) -> str | None:
    """The key as the store sees it: the tenant's own, except without API keys (one tenant, as before)."""
    if key is None or caller.key is None:
        return key
    return f"@{caller.tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def publish_shares(client: redis.Redis, keys: Keys, shares: Mapping[str, float]) -> None:
    """Tell the workers' scheduler each tenant's share (jobcontract.scheduling). A tenant no longer
    given one weighs 1 again. A gateway that starts while Redis is away serves with the shares
    Redis already holds (equal ones on a fresh Redis); fair share is a preference, never a refusal."""
    try:
        pipe = client.pipeline(transaction=True)
        pipe.delete(keys.tenant_shares)
        if shares:
            pipe.hset(keys.tenant_shares, mapping={tenant: str(share) for tenant, share in shares.items()})
        pipe.execute()
    except redis.RedisError as error:
        log.warning("could not publish the tenants' shares (%s); the scheduler keeps the ones it has", error)


class JobOwners:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def check(self, job_id: str, caller: Caller) -> None:
        """UnknownJob unless the job is the caller's (or the caller sees all and the job exists)."""
        if caller.sees_all:
            return
        owner, batch_id = (_text(v) for v in await self.client.hmget(self.keys.job(job_id), ["tenant", "batch"]))
        if owner is None and batch_id is not None:
            owner = _text(await self.client.hget(self.keys.batch(batch_id), "tenant"))
        if owner != caller.tenant:
            raise UnknownJob(job_id)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
