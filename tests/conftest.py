"""Shared fixtures: tiny random models for fast tests, the real SmolLM2 for slow ones, and a
peaked tiny teacher with small caches for the stage-two and eval tests.

The tiny models are built from a config (random weights, seeded) and share the SmolLM2
tokenizer, so a test exercises real tokenization, chat templates and a real vocab size
while a forward pass costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from distill_fixtures import make_cache


def _save_tiny(model_type: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF directory (converted once per user cache)."""
    from qadpipe.models import embedded_smollm2_dir

    return embedded_smollm2_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer, 64-wide random Llama with the SmolLM2 tokenizer (vocab 49152)."""
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer, 64-wide random Qwen3 (q/k norms, explicit head_dim) with the SmolLM2 tokenizer."""
    return _save_tiny("qwen3", tmp_path_factory.mktemp("tiny-qwen3"), smollm2_dir)


@pytest.fixture(scope="session")
def tied_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Qwen3-MoE (4 experts, top 2, tied embeddings) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("tiny-moe")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peaky_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny random Llama with its final norm scaled ×30, so its next-token distributions
    are peaked like a trained LM's (the raw random model is near-uniform: KL ~1e-4, no signal)."""
    import torch

    from qadpipe.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("peaky-llama")
    model = load_causal_lm(str(tiny_llama_dir), dtype="float32")
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    model.save_pretrained(out)
    load_tokenizer(str(tiny_llama_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory: pytest.TempPathFactory, peaky_llama_dir: Path) -> Path:
    return make_cache(tmp_path_factory.mktemp("topk"), peaky_llama_dir)


@pytest.fixture(scope="session")
def sampled_cache(tmp_path_factory: pytest.TempPathFactory, peaky_llama_dir: Path) -> Path:
    return make_cache(tmp_path_factory.mktemp("sampled"), peaky_llama_dir, "cache.target=sampled")


@pytest.fixture
def caller_stop_handlers() -> Iterator[list[int]]:
    """SIGINT and SIGTERM handled by the test itself, as a caller of qadpipe's stop handling
    would: the list of the signals they received (restored to what they were after the test)."""
    import signal

    seen: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, f: seen.append(s)) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield seen
    for signum, handler in previous.items():
        signal.signal(signum, handler)
