"""The tiny offline model: deterministic build, loadable by transformers, mlx-lm and llama.cpp, and the
two backends agreeing token for token at temperature 0.

Why: every backend test and benchmark in genq runs on this model because nothing can be downloaded.
If the GGUF twin drifted from the safetensors model (a missed RoPE permutation, a tokenizer mismatch, a
double BOS), llama.cpp and mlx workers would silently return different text for the same job. These
tests use the real libraries, no mocks, and never skip.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "build_tiny_model.py"
PROMPTS = [
    "The quick brown fox",
    "Hello world, what is the capital of France?",
    "a job runner takes prompts from a queue",
    "Numbers: 1 2 3 42 and 2024.",
]
N_TOKENS = 32


def _load_script() -> ModuleType:
    """Import ops/build_tiny_model.py by path, the way other genq code is expected to."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def btm() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def built(btm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return btm.build(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def hf_tokenizer(built: tuple[Path, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[0])


@pytest.fixture(scope="module")
def mlx_model(built: tuple[Path, Path]) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(str(built[0]))


@pytest.fixture(scope="module")
def llama(built: tuple[Path, Path]) -> Iterator[Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(built[1]), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def _mlx_greedy(mlx_model: tuple[Any, Any], prompt_ids: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, _ = mlx_model
    steps = generate_step(mx.array(prompt_ids), model, max_tokens=n, sampler=make_sampler(temp=0.0))
    return [int(tok) for tok, _ in steps]


def _llama_greedy(llm: Any, prompt_ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) >= n:
            break
    return out


def test_build_is_deterministic_idempotent_and_seeded(
    btm: ModuleType, built: tuple[Path, Path], tmp_path: Path
) -> None:
    mlx_dir, gguf_path = built
    again_mlx, again_gguf = btm.build(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again_mlx / name).read_bytes() == (mlx_dir / name).read_bytes(), name
    assert again_gguf.read_bytes() == gguf_path.read_bytes()

    stamp = json.loads((tmp_path / "again" / btm.STAMP_NAME).read_text())
    assert stamp["seed"] == 0 and stamp["script_version"] == btm.SCRIPT_VERSION

    # A matching stamp means no rewrite; --force rewrites the same bytes.
    mtime = (again_mlx / "model.safetensors").stat().st_mtime_ns
    assert btm.build(tmp_path / "again", seed=0) == (again_mlx, again_gguf)
    assert (again_mlx / "model.safetensors").stat().st_mtime_ns == mtime
    btm.build(tmp_path / "again", seed=0, force=True)
    assert (again_mlx / "model.safetensors").read_bytes() == (mlx_dir / "model.safetensors").read_bytes()

    # Another seed in the same folder: the stamp no longer matches, so the weights are rebuilt.
    btm.build(tmp_path / "again", seed=1)
    assert (again_mlx / "model.safetensors").read_bytes() != (mlx_dir / "model.safetensors").read_bytes()
    assert again_gguf.read_bytes() != gguf_path.read_bytes()
    assert (again_mlx / "tokenizer.json").read_bytes() == (mlx_dir / "tokenizer.json").read_bytes()
    assert not list((tmp_path / "again").glob(".tiny-build-*")), "scratch folder left behind"


def test_config_matches_weights(built: tuple[Path, Path], hf_tokenizer: Any) -> None:
    from safetensors.numpy import load_file

    config = json.loads((built[0] / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(hf_tokenizer)
    weights = load_file(built[0] / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert weights["lm_head.weight"].shape == (config["vocab_size"], config["hidden_size"])


def test_transformers_tokenizer_round_trips_and_has_chat_template(hf_tokenizer: Any) -> None:
    tok = hf_tokenizer
    assert 400 <= len(tok) <= 512
    text = "Hello world, the quick brown fox! Ünïcödé 123\n\ttabs  and  spaces"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.chat_template
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<s>user: Hi there\nassistant:"


def test_mlx_generates_non_eos_tokens(built: tuple[Path, Path], mlx_model: tuple[Any, Any]) -> None:
    from mlx_lm import generate

    model, tokenizer = mlx_model
    text = generate(model, tokenizer, prompt=PROMPTS[0], max_tokens=16)
    assert isinstance(text, str) and text.strip()

    ids = _mlx_greedy(mlx_model, tokenizer.encode(PROMPTS[0]), N_TOKENS)
    assert len(ids) == N_TOKENS
    eos = set(tokenizer.eos_token_ids)
    assert sum(t not in eos for t in ids) >= N_TOKENS * 3 // 4
    assert len(set(ids)) > 4, f"degenerate output {ids}"


def test_llama_cpp_tokenizes_like_transformers(llama: Any, hf_tokenizer: Any) -> None:
    texts = [*PROMPTS, " leading space", "It's we're they'll", "Ünïcödé 日本語 🎉", "x\n\n  y", ""]
    for text in texts:
        assert llama.tokenize(text.encode(), add_bos=True, special=True) == hf_tokenizer.encode(text), text
    assert llama.token_bos() == hf_tokenizer.bos_token_id
    assert llama.token_eos() == hf_tokenizer.eos_token_id

    # Chat: the template emits BOS itself, and both sides then tokenize without adding another.
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_ids = hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert hf_ids.count(hf_tokenizer.bos_token_id) == 1
    assert llama.tokenize(rendered.encode(), add_bos=False, special=True) == hf_ids
    assert llama.metadata["tokenizer.chat_template"] == hf_tokenizer.chat_template


def test_llama_cpp_greedy_matches_mlx(llama: Any, mlx_model: tuple[Any, Any]) -> None:
    _, tokenizer = mlx_model
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert ids == llama.tokenize(prompt.encode(), add_bos=True, special=True)
        mlx_ids = _mlx_greedy(mlx_model, ids, N_TOKENS)
        cpp_ids = _llama_greedy(llama, ids, N_TOKENS)
        assert cpp_ids == mlx_ids, prompt


def test_mlx_detokenizer_keeps_a_leading_space(mlx_model: tuple[Any, Any]) -> None:
    # mlx-lm's fast BPE detokenizer drops the first generated token's leading space while llama.cpp keeps
    # it; the tokenizer's decoder is shaped so that mlx-lm uses its exact (naive) detokenizer instead.
    _, tokenizer = mlx_model
    detok = tokenizer.detokenizer
    detok.reset()
    for tok in tokenizer.encode(" the sky is blue", add_special_tokens=False):
        detok.add_token(tok)
    detok.finalize()
    assert detok.text == " the sky is blue"


def test_generated_text_matches(llama: Any, mlx_model: tuple[Any, Any]) -> None:
    from mlx_lm import generate

    model, tokenizer = mlx_model
    for prompt in PROMPTS:
        mlx_text = generate(model, tokenizer, prompt=prompt, max_tokens=N_TOKENS)
        llama.reset()
        cpp = llama.create_completion(prompt, max_tokens=N_TOKENS, temperature=0.0, repeat_penalty=1.0)
        assert cpp["choices"][0]["text"] == mlx_text, prompt


def test_small_shape_builds_beside_the_tiny_model_without_touching_it(
    btm: ModuleType, built: tuple[Path, Path], tmp_path: Path
) -> None:
    # bench/prefix.py needs prompts of 1,500 tokens (the tiny model holds 512 positions); the larger
    # shape lives in its own files, so a folder holding both still serves the tiny model unchanged.
    tiny_mlx, tiny_gguf = btm.build(tmp_path, seed=0)
    stamp_before = (tmp_path / btm.STAMP_NAME).read_bytes()
    small_mlx, small_gguf = btm.build(tmp_path, seed=0, shape=btm.SHAPES["small"])
    assert small_mlx != tiny_mlx and small_gguf != tiny_gguf
    assert (tmp_path / btm.STAMP_NAME).read_bytes() == stamp_before
    assert (tiny_mlx / "model.safetensors").read_bytes() == (built[0] / "model.safetensors").read_bytes()
    assert tiny_gguf.read_bytes() == built[1].read_bytes()
    assert btm.build(tmp_path, seed=0) == (tiny_mlx, tiny_gguf)  # still current: not rebuilt

    config = json.loads((small_mlx / "config.json").read_text())
    assert (
        config["max_position_embeddings"]
        == 4096
        > json.loads((tiny_mlx / "config.json").read_text())["max_position_embeddings"]
    )
    assert (small_mlx / "tokenizer.json").read_bytes() == (tiny_mlx / "tokenizer.json").read_bytes()

    from llama_cpp import Llama
    from mlx_lm import load

    loaded = load(str(small_mlx))
    model, tokenizer = loaded[0], loaded[1]
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 120)  # over 512 tokens
    ids = tokenizer.encode(prompt)
    assert 512 < len(ids) < 4096
    mlx_ids = _mlx_greedy((model, tokenizer), ids, 8)
    llm = Llama(model_path=str(small_gguf), n_ctx=4096, n_threads=2, verbose=False)
    try:
        assert _llama_greedy(llm, ids, 8) == mlx_ids
    finally:
        llm.close()
