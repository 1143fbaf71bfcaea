"""The llama shape, special tokens and chat template of the tiny model.

One place for what the transformers / mlx-lm folder and the GGUF must agree on: if the two files
disagreed on a head count or a special token, the two backends would silently generate different
text for the same job.
"""

from __future__ import annotations

from typing import Any

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Special tokens come first so their ids are fixed (0..3) whatever the corpus.
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention: exercises the K permutation with n_head != n_head_kv
INTERMEDIATE = 128
MAX_POSITIONS = 512
ROPE_THETA = 10000.0
RMS_EPS = 1e-5

# A plain role-prefixed format: both transformers (mlx-lm) and llama-cpp-python render it with Jinja2.
# The template emits the BOS itself; callers tokenize the rendered prompt without adding another one
# (transformers' apply_chat_template and llama-cpp-python's Jinja2ChatFormatter both do that).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def model_config(vocab_size: int, tok: Any, layers: int = LAYERS) -> dict[str, Any]:
    """The llama config.json both transformers and mlx-lm read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(PAD),
        "torch_dtype": "float32",
    }
