"""Tiny Llama models built in memory (no tokenizer needed) for the quant tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def make_llama():
    """``make_llama(tie=False, seed=0, hidden=64, loud_token=None)`` -> a 2-layer
    LlamaForCausalLM, vocab 256.  With ``loud_token``, that token's activations from layer 0's
    attention on are ~100x every other token's (its embedding is one-hot on a coordinate no
    other token uses, which layer 0's input norm scales by 100): a test that puts it at padded
    positions sees whether a range counted them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tie: bool = False, seed: int = 0, hidden: int = 64,
              loud_token: int | None = None) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=tie)
        model = LlamaForCausalLM(config).eval()
        if loud_token is not None:
            with torch.no_grad():
                embedding = model.get_input_embeddings().weight
                embedding[:, 0] = 0
                embedding[loud_token] = 0
                embedding[loud_token, 0] = 1
                model.model.layers[0].input_layernorm.weight[0] = 100
        return model

    return build


@pytest.fixture
def quant_config():
    """``quant_config(**fields)`` -> a validated QuantConfig (the loader's checks apply)."""
    from qadpipe.config import build_config

    def build(**fields):
        return build_config({"quant": fields}).quant

    return build
