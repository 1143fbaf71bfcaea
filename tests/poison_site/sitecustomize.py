"""Test-only: a real mlx_lm.server that dies (SIGABRT, as a native fault would) on one marker prompt.

Put this folder on PYTHONPATH of a `genq worker`; Python imports `sitecustomize` in every
process, and only the mlx_lm.server processes act on it. A poison input that crashes a server
every time is what the fault tests need, and mlx_lm.server answers every malformed request we
tried with a clean 4xx, so the crash is injected here, on the real server, for one marker.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MARKER = "GENQ-POISON-PILL"

if any("mlx_lm.server" in arg for arg in getattr(sys, "orig_argv", ())):
    from mlx_lm import server as _server

    _original = _server.APIHandler.handle_text_completions

    def _handle_text_completions(self: Any) -> Any:
        if MARKER in str(self.body.get("prompt", "")):
            os.abort()
        return _original(self)

    _server.APIHandler.handle_text_completions = _handle_text_completions
