"""The prefix fingerprint: a short stable hash of the leading part of a job's prompt, computed at
admission, so placement can send jobs that share a prompt prefix to the worker whose server already
holds that prefix in its prompt cache (mlx_lm.server's LRU prompt cache, llama-server's slots).

What is hashed
- A prompt: its first `chars` characters.
- A chat: the first `chars` characters of a canonical rendering of its messages in order (each
  message as `role US content RS`, with the ASCII unit and record separators), not the rendering of
  the server's chat template. The template belongs to the model's files on the worker's host (the
  HF tokenizer config for mlx_lm.server, the GGUF metadata for llama.cpp, and the two may differ for
  one logical model); the gateway, the Python client and the batch runner admit jobs on hosts that
  have no model files, and loading a tokenizer at admission would cost more than the job's entry.
  Nothing is lost: a template is a function of the messages taken in order, so two chats whose
  canonical renderings share their first `chars` characters share their leading messages, and the
  template renders those into the same leading tokens (templates that move the system prompt behind
  the last user turn defeat the server's cache whatever the placement). The fingerprint is a hint:
  a wrong one costs cache hits, never a result.

How much is hashed (`chars`, per model in the routes: `ModelRoute.prefix_chars`)
The whole point is that jobs sharing an instruction get one fingerprint, and grouping two jobs that
share their first `chars` characters is never wrong for the cache: they do share that much. So the
leading part must be no longer than the shared instruction (else it takes in the varying text after
it and every job gets its own fingerprint), yet long enough that unrelated prompts opening with the
same boilerplate ("You are a helpful assistant.") do not pile onto one worker. The default, 1,024
characters, is about 250 tokens of English text: an instruction shorter than that is cheap to
prefill again anyway (a fraction of a 256-token answer's decode time), and distinct instructions
rarely agree on their first thousand characters. Characters, not tokens: admission has no tokenizer,
and characters are stable across hosts and backends. 0 turns the fingerprint off (no hint at all).

A caller who knows which jobs share a prefix says so with `prompt_cache_key` (OpenAI's parameter
of the same name and purpose): the key is hashed instead of the text, so jobs with one key are
placed together whatever their leading characters, and with fingerprints off too.

The hash: BLAKE2b, 8 bytes, as 16 hex digits: stable across processes and Python versions (unlike
hash()), 64 bits so thousands of prefixes never collide in practice, short in every queue entry.
The kind (prompt, chat or key) is hashed too, so a prompt never shares a fingerprint with a chat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from jobcontract.models import ChatMessage, GenerationRequest

PREFIX_CHARS = 1024  # the default leading part, in characters (see the module docstring for why)
PREFIX_OPTION = "prefix"  # the dramatiq message option that carries the fingerprint
_UNIT, _RECORD = "\x1f", "\x1e"


def leading_text(request: GenerationRequest, chars: int) -> str:
    """The first `chars` characters of what the fingerprint covers: the prompt, or the canonical
    rendering of the messages (built only as far as needed: a long chat is not joined whole)."""
    if request.prompt is not None:
        return request.prompt[:chars]
    pieces: list[str] = []
    length = 0
    for message in request.messages or ():
        piece = render(message)
        pieces.append(piece)
        length += len(piece)
        if length >= chars:
            break
    return "".join(pieces)[:chars]


def render(message: ChatMessage) -> str:
    """One message of the canonical chat rendering."""
    return f"{message.role}{_UNIT}{message.content}{_RECORD}"


def prefix_fingerprint(request: GenerationRequest, chars: int = PREFIX_CHARS) -> str | None:
    """16 hex digits naming the request's leading `chars` characters, or its `prompt_cache_key` when
    the caller gave one (the caller knows which jobs share a prefix better than any cut-off does;
    OpenAI's API takes the same key for the same purpose). None when `chars` is 0 and no key is given."""
    if request.prompt_cache_key is not None:
        return _digest("key", request.prompt_cache_key)
    if chars <= 0:
        return None
    return _digest("prompt" if request.prompt is not None else "chat", leading_text(request, chars))


def _digest(kind: str, text: str) -> str:
    digest = hashlib.blake2b(digest_size=8, person=b"genq-prefix")
    digest.update(kind.encode())
    digest.update(b"\0")
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()


def prefix_of(options: Mapping[str, Any]) -> str | None:
    """The fingerprint a queued message carries (its dramatiq `options`), or None: a message admitted
    with fingerprints off, or by a genq from before them. In Lua, on a queue entry's `m` field:
    `cjson.decode(m).options.prefix` (nil when absent)."""
    value = options.get(PREFIX_OPTION)
    return value if isinstance(value, str) and value else None
