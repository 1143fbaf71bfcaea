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
# A prompt that makes the server's generation thread die while the process lives on: mlx_lm.server then
# fails every request in flight, answers later ones "generation thread died" (404) and its /health 503.
GENERATION_DIES = "GENQ-GENERATION-DIES"

if any(
    server in arg for arg in getattr(sys, "orig_argv", ()) for server in ("mlx_lm.server", "workers.servers.mlx_server")
):
    import threading

    from mlx_lm import server as _server
    from mlx_lm.models.cache import LRUPromptCache

    _original = _server.APIHandler.handle_text_completions
    _doomed = threading.Event()

    def _handle_text_completions(self: Any) -> Any:
        prompt = str(self.body.get("prompt", ""))
        if MARKER in prompt:
            os.abort()
        if GENERATION_DIES in prompt:
            _doomed.set()  # the generation thread's next cache lookup raises, and nothing catches it
        return _original(self)

    _fetch = LRUPromptCache.fetch_nearest_cache

    def _fetch_nearest_cache(self: Any, model: Any, tokens: Any) -> Any:
        if _doomed.is_set():
            raise RuntimeError("genq test: the generation thread dies here")
        return _fetch(self, model, tokens)

    _server.APIHandler.handle_text_completions = _handle_text_completions
    LRUPromptCache.fetch_nearest_cache = _fetch_nearest_cache  # type: ignore[method-assign]
