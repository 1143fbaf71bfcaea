#!/usr/bin/env python3
"""Build a tiny random-weight llama model and its GGUF twin, offline, deterministically, in seconds.

Why this exists: nothing can be downloaded from a model hub on the machines that run genq's tests and
benchmarks, yet the mlx-lm and llama.cpp workers need a real model to serve. This script makes one from
nothing: a byte-level BPE tokenizer trained on a small built-in English corpus and random llama weights
drawn from numpy with a fixed seed. It writes

* ``OUT_DIR/tiny-llama/``   a transformers / mlx-lm loadable folder (config, safetensors, tokenizer files),
* ``OUT_DIR/tiny-llama.gguf`` the same weights and tokenizer for llama.cpp, written with the ``gguf``
  package (llama.cpp's own converter imports torch, which we do not want to install),
* ``OUT_DIR/genq-tiny.json``  a stamp (seed, script version, file digests) that makes reruns a no-op.

Both backends see bit-identical float32 weights, so greedy (temperature 0) generation from mlx-lm and
llama.cpp agrees token for token, which is what lets tests compare the two workers.

Usage: ``python ops/build_tiny_model.py OUT_DIR [--seed 0] [--force]``. Other code can load this file by
path and call :func:`build`.

Needs: numpy, safetensors, tokenizers, gguf (the ``tinymodel`` extra). No torch, no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Bump when anything that changes the output bytes changes: the stamp then no longer matches and the
# next build rewrites the model instead of silently keeping a stale one.
SCRIPT_VERSION = 1

MLX_DIRNAME = "tiny-llama"
GGUF_NAME = "tiny-llama.gguf"
STAMP_NAME = "genq-tiny.json"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Special tokens come first so their ids are fixed (0..3) whatever the corpus.
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]
TARGET_VOCAB = 512

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

# Small built-in corpus: enough distinct English to learn ~250 merges. ASCII only, so every merged
# token decodes to valid UTF-8 on its own.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A job runner takes prompts from a queue and hands them to a
model server, then stores the generated text and reports how long it took. Workers pull jobs, run them,
and acknowledge them when they are done; if a worker dies, the job comes back and another worker runs it.
The weather today is sunny with a light wind from the west. In the morning there was fog over the river,
but by noon the sky had cleared and people walked along the water with their dogs and their children.
She opened the door, looked at the garden, and decided that the roses needed water before the evening.
He wrote a letter to his brother about the new house, the long winter, and the small boat on the lake.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates like May 5 and times like 9:30.
Questions are common: What is the capital of France? How many legs does a spider have? Why is the sky
blue? Answers follow: Paris is the capital of France. A spider has eight legs. The sky is blue because
air scatters blue light more than red light. Tell me a story about a cat who learned to read books.
Once upon a time there was a cat who lived in a library. Every night the cat walked between the shelves
and looked at the pages of the books that the people had left open on the tables. One night the cat
read a whole page, and then another, and by the spring it had read every book about fish in the house.
The system prompt says: you are a helpful assistant. The user asks a question and the assistant answers
it in a short and friendly way. Please summarize the following paragraph in one sentence. Translate
this sentence into French. Write a short poem about the sea. Explain how a queue works to a child.
Good software is tested, measured and simple. Errors should be clear, logs should be useful, and every
request should have a timeout. Retry with backoff, but do not retry forever; keep the latency low.
Every morning the baker opens the shop at six, lights the oven, and bakes bread, rolls and small cakes.
The train to the city leaves at seven and arrives at eight; on Sundays there is only one train an hour.
Music, art and science help people understand the world and each other. Learning takes time and care.
"""


def _corpus_lines() -> list[str]:
    """Split the corpus into lines; training sees them in a fixed order so the result is reproducible."""
    return [line for line in CORPUS.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer() -> Any:
    """Train a GPT-2 style byte-level BPE on the built-in corpus.

    Byte-level with the GPT-2 split regex is exactly what llama.cpp implements for ``tokenizer.ggml.model
    = gpt2`` / ``tokenizer.ggml.pre = gpt-2``, so both backends cut any text into the same ids. The full
    256-byte alphabet is seeded so any input (even non-ASCII) can be encoded without an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # A one-element Sequence decodes exactly like a bare ByteLevel decoder, but it steers mlx-lm away from
    # its BPEStreamingDetokenizer, which drops the leading space of the first generated token (llama.cpp
    # keeps it): with a bare ByteLevel decoder about half of all greedy completions differed from
    # llama.cpp's by that one space. mlx-lm then uses its NaiveStreamingDetokenizer, which returns what
    # the tokenizer decodes (no measurable cost at this size). Real GPT-2 style BPE models served by
    # mlx-lm still show the trimmed space.
    tok.decoder = decoders.Sequence([decoders.ByteLevel()])
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend BOS like llama tokenizers do; llama.cpp does the same from ``add_bos_token`` in the GGUF.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _tokenizer_files(tok: Any, folder: Path) -> None:
    """Write tokenizer.json and the transformers side files so ``AutoTokenizer`` loads the folder."""
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD},
    )


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _suppressed_ids(tok: Any) -> list[int]:
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


def make_weights(seed: int, vocab_size: int, suppressed: list[int]) -> dict[str, np.ndarray]:
    """Random float32 llama weights in Hugging Face layout, drawn in a fixed order from ``seed``.

    Scales are 1/sqrt(fan_in) for projections so every layer moves the residual stream (a model that
    only echoes the embedding would loop on one token), and a wider output head so the top logits are
    far apart: greedy decoding then does not hinge on float rounding, and mlx and llama.cpp agree.
    """
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float64) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, HIDDEN), 1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        w[p + "self_attn.q_proj.weight"] = normal((HEADS * head_dim, HIDDEN), HIDDEN**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((KV_HEADS * head_dim, HIDDEN), HIDDEN**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((KV_HEADS * head_dim, HIDDEN), HIDDEN**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal((HIDDEN, HEADS * head_dim), HIDDEN**-0.5)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        w[p + "mlp.gate_proj.weight"] = normal((INTERMEDIATE, HIDDEN), HIDDEN**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((INTERMEDIATE, HIDDEN), HIDDEN**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((HIDDEN, INTERMEDIATE), INTERMEDIATE**-0.5)
    w["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    lm_head = normal((vocab_size, HIDDEN), 0.25)
    lm_head[suppressed] = 0.0
    w["lm_head.weight"] = lm_head
    return w


def _model_config(vocab_size: int, tok: Any) -> dict[str, Any]:
    """The llama config.json both transformers and mlx-lm read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
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


# --------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
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


def _gguf_tensors(weights: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Map HF tensor names to llama.cpp's, permuting Q and K, in a fixed order."""
    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", weights["model.embed_tokens.weight"])]
    for i in range(LAYERS):
        for hf, gg in _GGUF_NAMES.items():
            t = weights[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                t = _permute_rope(t, HEADS)
            elif hf == "self_attn.k_proj.weight":
                t = _permute_rope(t, KV_HEADS)
            out.append((f"blk.{i}.{gg}", np.ascontiguousarray(t)))
    out.append(("output_norm.weight", weights["model.norm.weight"]))
    out.append(("output.weight", weights["lm_head.weight"]))
    return out


def write_gguf(path: Path, weights: dict[str, np.ndarray], tok: Any) -> None:
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
    w.add_name("genq tiny llama")
    w.add_context_length(MAX_POSITIONS)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
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

    for name, t in _gguf_tensors(weights):
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    """Stable JSON (sorted keys, trailing newline) so identical inputs give identical bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    """Digest recorded in the stamp, so a file edited or truncated after the build triggers a rebuild."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_stamp(seed: int) -> dict[str, Any]:
    """The stamp fields that must match for a previous build to be reused."""
    return {"seed": seed, "script_version": SCRIPT_VERSION}


def _is_current(out_dir: Path, seed: int) -> bool:
    """True when a previous build with the same seed and script version is complete and untouched."""
    stamp_path = out_dir / STAMP_NAME
    mlx_dir, gguf_path = out_dir / MLX_DIRNAME, out_dir / GGUF_NAME
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in _expected_stamp(seed).items()):
        return False
    digests: dict[str, str] = stamp.get("sha256", {})
    files = {
        "model.safetensors": mlx_dir / "model.safetensors",
        "tokenizer.json": mlx_dir / "tokenizer.json",
        GGUF_NAME: gguf_path,
    }
    for key, path in files.items():
        if not path.is_file() or digests.get(key) != _sha256(path):
            return False
    return (mlx_dir / "config.json").is_file()


def build(out_dir: Path, seed: int = 0, force: bool = False) -> tuple[Path, Path]:
    """Build (or reuse) the tiny model under ``out_dir`` and return ``(mlx_folder, gguf_path)``.

    Idempotent: an existing build with a matching stamp is kept unless ``force``. A new build is written
    into a scratch folder next to the targets and moved into place, so a crash never leaves a half
    model that a stamp claims is whole.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    mlx_dir, gguf_path = out_dir / MLX_DIRNAME, out_dir / GGUF_NAME
    if not force and _is_current(out_dir, seed):
        return mlx_dir, gguf_path

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=out_dir))
    try:
        tok = train_tokenizer()
        vocab_size = tok.get_vocab_size()
        weights = make_weights(seed, vocab_size, _suppressed_ids(tok))

        new_mlx = scratch / MLX_DIRNAME
        new_mlx.mkdir()
        _write_json(new_mlx / "config.json", _model_config(vocab_size, tok))
        _write_json(
            new_mlx / "generation_config.json",
            {
                "bos_token_id": tok.token_to_id(BOS),
                "eos_token_id": tok.token_to_id(EOS),
                "pad_token_id": tok.token_to_id(PAD),
                "do_sample": False,
            },
        )
        # "format": "pt" is what transformers expects in the header; mlx ignores it.
        save_file(weights, str(new_mlx / "model.safetensors"), metadata={"format": "pt"})
        _tokenizer_files(tok, new_mlx)
        new_gguf = scratch / GGUF_NAME
        write_gguf(new_gguf, weights, tok)
        # safetensors writes its file 0600 (via a temp file) and mkdtemp is 0700: make the model
        # readable by the worker processes whatever user they run as.
        for f in [*new_mlx.iterdir(), new_gguf]:
            f.chmod(0o644)
        new_mlx.chmod(0o755)

        (out_dir / STAMP_NAME).unlink(missing_ok=True)
        if mlx_dir.exists():
            shutil.rmtree(mlx_dir)
        new_mlx.rename(mlx_dir)
        os.replace(new_gguf, gguf_path)
        stamp = _expected_stamp(seed) | {
            "vocab_size": vocab_size,
            "sha256": {
                "model.safetensors": _sha256(mlx_dir / "model.safetensors"),
                "tokenizer.json": _sha256(mlx_dir / "tokenizer.json"),
                GGUF_NAME: _sha256(gguf_path),
            },
        }
        _write_json(out_dir / STAMP_NAME, stamp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return mlx_dir, gguf_path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build into OUT_DIR and print where the two models are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, help="folder to write tiny-llama/ and tiny-llama.gguf into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    reused = not args.force and _is_current(args.out_dir, args.seed)
    mlx_dir, gguf_path = build(args.out_dir, seed=args.seed, force=args.force)
    verb = "kept" if reused else "built"
    print(f"{verb} {mlx_dir} and {gguf_path} (seed {args.seed}) in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
