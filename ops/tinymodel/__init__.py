"""The tiny random-weight model builder of ops/build_tiny_model.py, in pieces with one job each.

Why a folder beside the script rather than a module of genq: the tiny model is built from a source
checkout (genq's wheel does not ship this, nor need numpy, tokenizers or gguf), and ops/ is not a
package. ops/build_tiny_model.py loads this folder by path, so the pieces import each other
relatively and work whether the script is run (`python ops/build_tiny_model.py OUT_DIR`) or itself
loaded by path (genq/tiny_model.py, tests/test_tiny_model.py).

* architecture.py: the llama shape, special tokens and chat template both backends must agree on,
* corpus.py:       the built-in English text the tokenizer is trained on,
* tokenizer.py:    the byte-level BPE tokenizer and its transformers files,
* weights.py:      the seeded random weights,
* hf_folder.py:    the transformers / mlx-lm folder (config, safetensors, tokenizer),
* gguf_file.py:    the llama.cpp twin of the same weights and tokenizer,
* stamp.py:        what makes a rerun a no-op (and a stale or damaged build a rebuild),
* build.py:        all of the above, written atomically.
"""
