"""Byte-stable file helpers shared by the model folder and the stamp.

Stable bytes matter because the stamp records digests: identical inputs must give identical files,
and a file edited or truncated after the build must no longer match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    """Stable JSON (sorted keys, trailing newline) so identical inputs give identical bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    """Digest recorded in the stamp, so a file edited or truncated after the build triggers a rebuild."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
