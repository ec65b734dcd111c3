from __future__ import annotations

from typing import Any

import pytest


def successor_model(vocab: int = 512, hidden: int = 64) -> Any:
    """A Llama whose every position predicts ``input_id + 1`` (mod vocab), whatever came before.

    The attention and MLP outputs are zeroed, so the last hidden state is the normalised
    embedding of the current token (norm ~sqrt(hidden)); ``lm_head`` row ``v`` is 4 x the unit
    embedding of ``v - 1``, so the logit of ``x + 1`` is ~4 sqrt(hidden) = 32 against ~N(0, 16)
    for every other token.
    A target row taken from the wrong position shows up as the wrong top-1 id.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        unit = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=-1)
        model.lm_head.weight.copy_(4.0 * torch.roll(unit, shifts=1, dims=0))
    return model


@pytest.fixture(scope="module")
def successor() -> Any:
    return successor_model()
