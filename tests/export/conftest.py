"""Export fixtures: fake-quantized students built the way the trainer builds them
(load_causal_lm -> apply_recipe -> calibrate), and a tiny model with tied embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch


def make_student(model_dir: Path, preset: str, group_size: int | None = None, dtype: str = "bfloat16",
                 **quant: Any) -> tuple[torch.nn.Module, Any]:
    """A calibrated fake-quant student of ``model_dir`` and its config (static input ranges
    calibrated on two seeded random-token batches)."""
    from qadpipe.config import build_config
    from qadpipe.models import load_causal_lm
    from qadpipe.quant.calibrate import calibrate
    from qadpipe.quant.recipe import apply_recipe

    config = build_config({"model": {"path": str(model_dir), "dtype": dtype},
                           "quant": {"preset": preset, "group_size": group_size, **quant}})
    model = load_causal_lm(str(model_dir), dtype=dtype)
    apply_recipe(model, config.quant)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(0, vocab, (2, 16), generator=generator),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(2)]
    calibrate(model, batches, num_batches=2)
    return model.eval(), config


@pytest.fixture
def student() -> Callable[..., tuple[torch.nn.Module, Any]]:
    return make_student


@pytest.fixture(scope="session")
def tiny_tied_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """Like ``tiny_llama_dir`` but with ``tie_word_embeddings`` (as SmolLM2 has)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-tied-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True))
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
