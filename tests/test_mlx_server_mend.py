"""workers/servers/mlx_server.py's mend of mlx-lm's prompt cache lookup, on mlx's own cache classes:
a prompt that exactly matches a kept sequence gets the cache one token short and that token to process,
never nothing (which killed mlx_lm.server's generation thread; the end-to-end test is in
tests/test_prompt_cache.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, LRUPromptCache

from workers.servers.mlx_server import mend_exact_prompt_cache_hits


def kept(tokens: list[int]) -> list[KVCache]:
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 1, len(tokens), 4)), mx.zeros((1, 1, len(tokens), 4)))
    return [cache]


def test_an_exact_hit_leaves_one_token_to_process_and_other_hits_are_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(LRUPromptCache, "fetch_nearest_cache", LRUPromptCache.fetch_nearest_cache)  # undone after
    assert mend_exact_prompt_cache_hits()
    assert mend_exact_prompt_cache_hits()  # twice is once: the lookup is not wrapped again
    cache = LRUPromptCache(max_size=10)
    cache.insert_cache("m", [1, 2, 3, 4], kept([1, 2, 3, 4]))
    exact, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 4])
    assert rest == [4] and exact is not None and exact[0].offset == 3
    longer, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5, 6])
    assert rest == [5, 6] and longer is not None and longer[0].offset == 4
    assert cache.fetch_nearest_cache("m", [9, 9]) == (None, [9, 9])
    # The kept entry itself is not trimmed: the next exact hit is served the same way.
    again, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 4])
    assert rest == [4] and again is not None and again[0].offset == 3
