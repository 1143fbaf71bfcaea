"""Where everything lives in Redis, and what queues are called. One place, so no side guesses."""

from __future__ import annotations

from dataclasses import dataclass

from jobcontract.models import Backend, Lane

CONSUMER_GROUP = "genq"
# A partition of a queue other than its own stream is the queue's stream with this and the partition's
# name after it (tenant names never hold ':'); the Lua side is told the infix, never builds it (Keys.partition).
PARTITION_INFIX = ":part:"
# Whose a job is when nobody says (a gateway without API keys, the Python client): its entries
# stay on the queue's own stream, so a deployment without tenants has exactly one stream a queue.
DEFAULT_TENANT = "default"
# Jobs that share a prompt prefix wait in one of this many prefix shards of their tenant's partitions,
# so a worker can take the shards it owns first (jobcontract.scheduling); a bound on partitions per tenant.
PREFIX_SHARDS = 32
SHARD_MARK = "#"  # a partition `tenant#shard` (tenant names never hold '#')


def partition_of(tenant: str | None, prefix: str | None = None) -> str | None:
    """The partition of a queue an entry waits in, as the queue's partition set names it: None for the queue's
    own stream (the default tenant's jobs without a prefix fingerprint), else the tenant, with
    `#shard` when the job has a prefix fingerprint (jobcontract.prefix): its first 32 bits modulo
    PREFIX_SHARDS. Partitions are per tenant for fair share and per shard for prefix-cache placement."""
    owner = tenant or DEFAULT_TENANT
    shard = _shard(prefix)
    if shard is None:
        return None if owner == DEFAULT_TENANT else owner
    return f"{owner}{SHARD_MARK}{shard}"


def partition_tenant(member: str | None) -> str:
    """The tenant a partition belongs to."""
    return (member or DEFAULT_TENANT).split(SHARD_MARK, 1)[0]


def _shard(prefix: str | None) -> int | None:
    if not prefix:
        return None
    try:
        return int(prefix[:8], 16) % PREFIX_SHARDS
    except ValueError:
        return None


def queue_name(model: str, backend: Backend, lane: Lane) -> str:
    """The dramatiq queue a pool of workers for (model, backend) reads, one per lane."""
    return f"{model}.{backend.value}.{lane.value}"


def pool_name(model: str, backend: Backend) -> str:
    """The workers serving one model on one backend; their queues are the pool's lanes."""
    return f"{model}.{backend.value}"


DELAY_SUFFIX = ".DQ"  # dramatiq's delay queue of a queue: dq_name(queue)


@dataclass(frozen=True, order=True)
class QueueRef:
    """A queue name read back: the pool it belongs to, its lane, and whether it is the delay queue."""

    model: str
    backend: Backend
    lane: Lane
    delayed: bool = False

    @property
    def pool(self) -> str:
        return pool_name(self.model, self.backend)

    def on(self, backend: Backend) -> str:
        """The same queue (delayed or not) of another backend's pool."""
        name = queue_name(self.model, backend, self.lane)
        return name + DELAY_SUFFIX if self.delayed else name


def parse_queue(name: str) -> QueueRef | None:
    """`{model}.{backend}.{lane}[.DQ]`, read from the right (model names may hold dots); None for a
    name that is not genq's. The inverse of queue_name (and of dq_name on it)."""
    delayed = name.endswith(DELAY_SUFFIX)
    parts = name.removesuffix(DELAY_SUFFIX).rsplit(".", 2)
    if len(parts) != 3:
        return None
    try:
        return QueueRef(parts[0], Backend(parts[1]), Lane(parts[2]), delayed)
    except ValueError:
        return None


def actor_name(lane: Lane) -> str:
    return f"genq_generate_{lane.value}"


@dataclass(frozen=True)
class Keys:
    namespace: str = "genq"

    def stream(self, queue: str) -> str:
        """The Redis stream behind a dramatiq queue."""
        return f"{self.namespace}:q:{queue}"

    def partition(self, queue: str, member: str | None = None) -> str:
        """The stream one partition of a queue is (see partition_of): the queue's own stream for None,
        `{stream}:tenant:{member}` for any other. Partitions are what lets a worker serve tenants in turn
        and take the prefixes it holds first (jobcontract.protocol.take), not first come first served."""
        if not member or member == DEFAULT_TENANT:
            return self.stream(queue)
        return self.stream(queue) + PARTITION_INFIX + member

    def partitions(self, queue: str) -> str:
        """A set: the partitions (`tenant` or `tenant#shard`) with a stream of their own in a queue.
        Bounded by the configured tenants x (PREFIX_SHARDS + 1); written by every script that adds
        to such a partition."""
        return self.stream(queue) + ":partitions"

    def bell(self, queue: str) -> str:
        """A stream rung (one entry) for each partition of a queue made (entry.lua), read by its idle
        consumers beside the partitions, so a new tenant's first job wakes one at once. Capped (MAXLEN ~)."""
        return self.stream(queue) + ":bell"

    def fair_tags(self, queue: str) -> str:
        """A hash: tenant -> the virtual time its next entry of a queue starts at (start-time fair
        queueing), and `~` -> the queue's virtual time. One field per tenant that ever had a partition."""
        return self.stream(queue) + ":fair"

    @property
    def placement(self) -> str:
        """A hash: worker -> its WorkerModels record as JSON (the models it serves and holds loaded,
        their sizes, its memory budget), for admission, `genq models` and the scheduler."""
        return f"{self.namespace}:placement"

    @property
    def placement_until(self) -> str:
        """A sorted set: worker -> the Redis-clock instant (µs) until which its placement record
        holds; records past it are dropped on every publish."""
        return f"{self.namespace}:placement:until"

    @property
    def tenant_shares(self) -> str:
        """A hash: tenant -> its weight in fair share (the API key configuration's `share`), written
        by the gateway when it starts; a tenant not in it weighs 1."""
        return f"{self.namespace}:tenant_shares"

    def job(self, job_id: str) -> str:
        """A hash: state, queue, model, timings, and the result once there is one; `tenant` when the
        gateway queued it (whose job it is)."""
        return f"{self.namespace}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """A stream per job: tokens as they come, then one `done` entry carrying the result."""
        return f"{self.namespace}:job:{job_id}:events"

    def idempotency(self, key: str) -> str:
        return f"{self.namespace}:idem:{key}"

    def alive(self, consumer: str) -> str:
        """Present while a consumer's owner vouches for it; its expiry frees the consumer's jobs."""
        return f"{self.namespace}:alive:{consumer}"

    def pool(self, pool: str) -> str:
        """A sorted set: worker -> the Redis-clock instant (µs) until which it is vouched alive."""
        return f"{self.namespace}:pool:{pool}"

    def circuit(self, pool: str) -> str:
        """Exists (with the cool-down as TTL) while a pool's circuit breaker is open."""
        return f"{self.namespace}:circuit:{pool}"

    @property
    def queues(self) -> str:
        """A set of every stream that was ever declared, for the janitor and the metrics collector."""
        return f"{self.namespace}:queues"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}:dead"

    @property
    def cancel_channel(self) -> str:
        return f"{self.namespace}:cancel"

    def batch_done(self, batch_id: str) -> str:
        """A stream of finished job ids of one batch, read in order by a resumable batch runner."""
        return f"{self.namespace}:batch:{batch_id}:done"

    def batch(self, batch_id: str) -> str:
        """A hash: a batch's status, its counts and its runner's checkpoint; `tenant` for a gateway batch."""
        return f"{self.namespace}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """A hash of the jobs a batch submitted (job id -> custom_id): to cancel it without its input
        file, and to name the line of a job cancelled before it ran (its result has no metadata)."""
        return f"{self.namespace}:batch:{batch_id}:jobs"

    def batch_lease(self, batch_id: str) -> str:
        """Held (with a TTL) by the one process running a batch; a lapsed lease lets another adopt it."""
        return f"{self.namespace}:batch:{batch_id}:lease"

    @property
    def batches(self) -> str:
        """A sorted set of batch ids by creation time, for listing."""
        return f"{self.namespace}:batches"

    @property
    def active_batches(self) -> str:
        """The gateway's batches that are not finished yet, for a gateway to adopt after a restart."""
        return f"{self.namespace}:batches:active"

    def file(self, file_id: str) -> str:
        """A hash: an uploaded (or generated) file's name, purpose, creation time and `tenant`."""
        return f"{self.namespace}:file:{file_id}"

    def file_content(self, file_id: str) -> str:
        return f"{self.namespace}:file:{file_id}:content"

    @property
    def files(self) -> str:
        """A sorted set of file ids by creation time, for listing."""
        return f"{self.namespace}:files"

    def tenant_files(self, tenant: str) -> str:
        """A sorted set of one tenant's file ids by creation time: its listing reads no one else's
        files (the file hash's `tenant` field says whose a file is)."""
        return f"{self.namespace}:tenant:{tenant}:files"

    def tenant_file_bytes(self, tenant: str) -> str:
        """A sorted set of one tenant's file ids (uploads under way too) scored by their bytes, for
        its bounds on files and bytes; an id whose file is gone is dropped when bounds are checked."""
        return f"{self.namespace}:tenant:{tenant}:file_bytes"

    def tenant_batches(self, tenant: str) -> str:
        """A sorted set of one tenant's gateway batch ids by creation time, for its listing (the batch
        hash's `tenant` field says whose a batch is)."""
        return f"{self.namespace}:tenant:{tenant}:batches"

    def caller_jobs(self, caller: str) -> str:
        """A sorted set of an API key's unfinished jobs (id -> reserved at), for its bound on queued work."""
        return f"{self.namespace}:caller:{caller}:jobs"

    def caller_batches(self, caller: str) -> str:
        """A sorted set of an API key's unfinished gateway batches, for its bound on batches."""
        return f"{self.namespace}:caller:{caller}:batches"

    @property
    def rate_limits(self) -> str:
        """The prefix of the gateway's per-key rate-limit windows (kept by the `limits` library)."""
        return f"{self.namespace}:rate"
