"""The tiny model's tokenizer: a GPT-2 style byte-level BPE trained on the built-in corpus.

Byte-level BPE because it is the one scheme both backends implement identically from the files
written here (tokenizer.json for transformers / mlx-lm, the same vocabulary and merges in the GGUF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .architecture import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, TINY, UNK
from .corpus import corpus_lines
from .files import write_json

TARGET_VOCAB = 512


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
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend BOS like llama tokenizers do; llama.cpp does the same from ``add_bos_token`` in the GGUF.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def write_tokenizer_files(tok: Any, folder: Path, max_positions: int = TINY.max_positions) -> None:
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
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(
        folder / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD},
    )
