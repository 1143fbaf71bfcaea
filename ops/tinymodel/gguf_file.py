"""The llama.cpp half of the tiny model: the same weights and tokenizer in one GGUF file.

Written with the ``gguf`` package because llama.cpp's own converter imports torch, which genq does
not install. Kept bit-identical to the safetensors weights (F32, Q/K rows permuted the way
llama.cpp's converter does) so greedy generation matches mlx-lm's token for token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .architecture import BOS, CHAT_TEMPLATE, EOS, PAD, RMS_EPS, ROPE_THETA, SPECIAL_TOKENS, TINY, UNK, Shape


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one.

    Same as ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py (called with n_head = the head
    count of that projection). Without it llama.cpp rotates the wrong pairs and its output diverges.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(weights: dict[str, np.ndarray], shape: Shape = TINY) -> list[tuple[str, np.ndarray]]:
    """Map HF tensor names to llama.cpp's, permuting Q and K, in a fixed order."""
    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", weights["model.embed_tokens.weight"])]
    for i in range(shape.layers):
        for hf, gg in _GGUF_NAMES.items():
            t = weights[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                t = permute_rope(t, shape.heads)
            elif hf == "self_attn.k_proj.weight":
                t = permute_rope(t, shape.kv_heads)
            out.append((f"blk.{i}.{gg}", np.ascontiguousarray(t)))
    out.append(("output_norm.weight", weights["model.norm.weight"]))
    out.append(("output.weight", weights["lm_head.weight"]))
    return out


def write_gguf(path: Path, weights: dict[str, np.ndarray], tok: Any, shape: Shape = TINY) -> None:
    """Write the GGUF: llama hyper-parameters, a gpt2-style BPE vocabulary, and all tensors in F32."""
    import gguf

    tj = json.loads(tok.to_str())
    vocab: dict[str, int] = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError("tokenizer vocabulary ids are not contiguous")
    # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    special = set(SPECIAL_TOKENS)
    token_types = [int(gguf.TokenType.CONTROL) if t in special else int(gguf.TokenType.NORMAL) for t in tokens]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"genq {shape.name} llama")
    w.add_context_length(shape.max_positions)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(len(tokens))
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # "gpt2" here makes llama.cpp refuse the file
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[BOS])
    w.add_eos_token_id(vocab[EOS])
    w.add_unk_token_id(vocab[UNK])
    w.add_pad_token_id(vocab[PAD])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, t in gguf_tensors(weights, shape):
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
