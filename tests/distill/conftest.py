"""Fixtures for the stage-two tests: a tiny teacher with peaked distributions and caches of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_fixtures import make_cache


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
