"""The tiny model's weights: random float32 llama weights drawn from numpy with a fixed seed.

Random because nothing can be downloaded, seeded so every machine builds the same model, and shaped
so greedy generation is stable enough for mlx-lm and llama.cpp to agree token for token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .architecture import SPECIAL_TOKENS, TINY, Shape


def suppressed_ids(tok: Any) -> list[int]:
    """Token ids the model should (practically) never emit.

    Specials (so greedy generation does not stop at once on EOS) and lone non-ASCII bytes (so generated
    text is valid UTF-8 and both servers decode it to the same string). Their output rows are zero, so
    their logit is exactly 0 while the max over the ~400 other random logits is well above it.
    """
    from tokenizers import pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps printable ASCII 0x21..0x7e to itself; everything else gets a stand-in code point.
    ascii_ok = {chr(b) for b in range(0x21, 0x7F)} | {"\u0120", "\u010a"}  # 'Ġ' (space), 'Ċ' (newline)
    vocab: dict[str, int] = tok.get_vocab()
    ids = [vocab[t] for t in SPECIAL_TOKENS]
    ids += [vocab[c] for c in byte_chars if c not in ascii_ok and c in vocab]
    return sorted(ids)


def make_weights(seed: int, vocab_size: int, suppressed: list[int], shape: Shape = TINY) -> dict[str, np.ndarray]:
    """Random float32 llama weights in Hugging Face layout, drawn in a fixed order from ``seed``.

    Scales are 1/sqrt(fan_in) for projections so every layer moves the residual stream (a model that
    only echoes the embedding would loop on one token), and a wider output head so the top logits are
    far apart: greedy decoding then does not hinge on float rounding, and mlx and llama.cpp agree.
    """
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, intermediate = shape.hidden, shape.heads, shape.kv_heads, shape.intermediate
    head_dim = shape.head_dim

    def normal(dims: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float64) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, hidden), 1.0)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = normal((heads * head_dim, hidden), hidden**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((kv_heads * head_dim, hidden), hidden**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((kv_heads * head_dim, hidden), hidden**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal((hidden, heads * head_dim), hidden**-0.5)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        w[p + "mlp.gate_proj.weight"] = normal((intermediate, hidden), hidden**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((intermediate, hidden), hidden**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((hidden, intermediate), intermediate**-0.5)
    w["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    lm_head = normal((vocab_size, hidden), 0.25)
    lm_head[suppressed] = 0.0
    w["lm_head.weight"] = lm_head
    return w
