"""The transformers / mlx-lm half of the tiny model: a folder with config, safetensors and tokenizer.

Written with the ``safetensors`` package directly (no torch), in the layout ``AutoTokenizer`` and
``mlx_lm.load`` expect, so both read it without a conversion step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .architecture import BOS, EOS, PAD, TINY, Shape, model_config
from .files import write_json
from .tokenizer import write_tokenizer_files


def write_hf_folder(folder: Path, weights: dict[str, np.ndarray], tok: Any, shape: Shape = TINY) -> None:
    """Fill the (existing, empty) ``folder`` with config.json, generation_config.json, the safetensors
    weights and the tokenizer files."""
    from safetensors.numpy import save_file

    vocab_size = tok.get_vocab_size()
    write_json(folder / "config.json", model_config(vocab_size, tok, shape))
    write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": tok.token_to_id(BOS),
            "eos_token_id": tok.token_to_id(EOS),
            "pad_token_id": tok.token_to_id(PAD),
            "do_sample": False,
        },
    )
    # "format": "pt" is what transformers expects in the header; mlx ignores it.
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(tok, folder, shape.max_positions)
