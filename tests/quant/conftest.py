"""Tiny Llama models built in memory (no tokenizer needed) for the quant tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def make_llama():
    """``make_llama(tie=False, seed=0, hidden=64)`` -> a 2-layer LlamaForCausalLM, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tie: bool = False, seed: int = 0, hidden: int = 64) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=tie)
        return LlamaForCausalLM(config).eval()

    return build


@pytest.fixture
def quant_config():
    """``quant_config(**fields)`` -> a validated QuantConfig (the loader's checks apply)."""
    from qadpipe.config import build_config

    def build(**fields):
        return build_config({"quant": fields}).quant

    return build
