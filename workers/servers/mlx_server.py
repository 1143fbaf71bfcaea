"""mlx_lm.server as genq starts it: the server itself, with one upstream defect mended in-process.

mlx-lm 0.32.2's prompt cache answers a prompt whose tokens exactly equal a cached sequence (an earlier
request's prompt and output: a continuation sent back, or two batch lines where one is another's
prompt plus what it generated) with nothing left to process. `insert_segments` then raises "has an
empty prompt" in the server's one generation thread, which dies: every request in flight is cut off
and the server answers nothing until it is restarted (upstream issue ml-explore/mlx-lm#1215; the
fix, pull requests #1581/#1596/#1887, had not shipped in a release when this was written). The
mend is theirs: on an exact hit, hand back the cache one token short and process that last token,
or process the whole prompt when the cache cannot be trimmed. It wraps the cache lookup rather than
replacing it, so a release that fixes the lookup makes it a no-op, and one that moves it is served
unmended (with a line on stderr) rather than not at all.

This module imports only mlx_lm (it runs as the server process: `python -m workers.servers.mlx_server`
with mlx_lm.server's own flags), so nothing of genq's worker stack is loaded into the server.
"""

from __future__ import annotations

import sys
from typing import Any


def mend_exact_prompt_cache_hits() -> bool:
    """Wrap the lookup; False (and the server runs as released) when this mlx-lm has no such lookup."""
    try:
        from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

        lookup = LRUPromptCache.fetch_nearest_cache
    except (ImportError, AttributeError) as error:
        print(f"genq: mlx_lm's prompt cache lookup not found ({error}); serving it unmended", file=sys.stderr)
        return False
    if getattr(lookup, "genq_mended", False):
        return True

    def fetch_nearest_cache(self: Any, model: Any, tokens: list[int]) -> tuple[Any, list[int]]:
        cache, rest = lookup(self, model, tokens)
        if cache is None or rest or not tokens:
            return cache, rest
        if can_trim_prompt_cache(cache):  # the cache is the lookup's own copy: trimming it is safe
            trim_prompt_cache(cache, 1)
            return cache, tokens[-1:]
        return None, tokens

    fetch_nearest_cache.genq_mended = True  # type: ignore[attr-defined]
    LRUPromptCache.fetch_nearest_cache = fetch_nearest_cache  # type: ignore[method-assign]
    return True


def main() -> None:
    mend_exact_prompt_cache_hits()
    from mlx_lm.server import main as serve

    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
