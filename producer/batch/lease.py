"""A batch's lease: one live process runs a batch at a time; a holder that died on this host is
recognised at once, one elsewhere lapses LEASE_TTL_S after its last renewal."""

from __future__ import annotations

import os
import socket

LEASE_TTL_S = 10.0


class BatchBusy(RuntimeError):
    """Another live process is running this batch."""


def died_here(holder: str) -> bool:
    """A lease owner named `host:pid:...` on this host whose process is gone."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
