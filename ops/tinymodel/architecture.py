"""The llama shapes, special tokens and chat template of the models the builder makes.

One place for what the transformers / mlx-lm folder and the GGUF must agree on: if the two files
disagreed on a head count or a special token, the two backends would silently generate different
text for the same job.

Two shapes share the tokenizer, special tokens and chat template:
* TINY, the model every test and benchmark runs on: so small that loading and generating cost
  nothing measurable, and 512 positions;
* SMALL, for benchmarks where prefill must cost something (bench/prefix.py: a 1,500-token
  instruction served from the prompt cache or computed again): 4,096 positions, twice TINY's width
  and three times its feed-forward (0.52 M weights with the 512-token vocabulary, 2.1 MB in float32;
  TINY has 0.14 M). Width is not what makes a long prefill dear on a CPU: mlx's CPU backend on Linux
  (no Metal) does a few GFLOP/s, and at 1,500 tokens the causal attention dominates, so even TINY's
  width would take ~0.6 s per 1,500-token prefill on one core, and SMALL ~1 s; 256 wide and 4 layers
  took ~5 s, too slow for a benchmark that has to prefill a few hundred of them. Measured again in
  bench/results/prefix.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Special tokens come first so their ids are fixed (0..3) whatever the corpus.
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]

ROPE_THETA = 10000.0
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    """A llama shape and the names of its files: the builder writes `OUT_DIR/{name}-llama/`,
    `OUT_DIR/{name}-llama.gguf` and the stamp `OUT_DIR/genq-{name}.json`, so shapes live side by side."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int  # fewer than heads: grouped-query attention exercises the K permutation in the GGUF
    intermediate: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self, vocab_size: int) -> int:
        """Weights in the model (embedding and output head included)."""
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * kv * self.hidden
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * vocab_size * self.hidden + self.layers * layer + self.hidden


# The tiny model's bytes are pinned by its stamp and tests: never change this shape.
TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=512)
SMALL = Shape("small", hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, max_positions=4096)
SHAPES = {shape.name: shape for shape in (TINY, SMALL)}

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


def model_config(vocab_size: int, tok: Any, shape: Shape = TINY) -> dict[str, Any]:
    """The llama config.json both transformers and mlx-lm read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_positions,
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
