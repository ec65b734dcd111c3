"""Random-weight models with a real model's shapes, for the benchmarks that need a GPU-sized
student (imported by them, not a benchmark to run itself): the device machines have no model hub, and a model built from a config costs nothing to
ship.  One table, so every benchmark measures the same model.

``qwen3-1.7b-random`` is the model the issues name for GPU figures.  ``qwen3-tiny-random`` keeps
Qwen3's layer types and real vocabulary (151936, so the vocab-sized paths -- chunked losses, top-k
over the logits -- run at their real width) with a tiny body: ``bench/gpu_checks.sh --smoke`` runs
every GPU step on a CPU with it, so a script that has never met a GPU does not first fail on one.

The MoE shapes (a ``num_experts`` entry makes a ``Qwen3MoeForCausalLM``) time fake-quantized
experts: ``qwen3-30b-a3b-4layer-random`` is four of Qwen3-30B-A3B's 48 layers (128 experts, 8
per token) at their real size, for a GPU; ``qwen3-moe-cpu-random`` keeps its 128 experts with a
small body and vocabulary, so on a CPU the step is the experts', not the LM head's.
"""

from __future__ import annotations

from typing import Any

QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-1.7b-random": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3-tiny-random": dict(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3-30b-a3b-4layer-random": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen3-moe-cpu-random": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                                 num_experts=128, num_experts_per_tok=8, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                                 rope_theta=1000000.0),
}


def random_qwen3(name: str, device: str, dtype: Any = None) -> Any:
    """A seeded random ``Qwen3ForCausalLM`` (or ``Qwen3MoeForCausalLM``) with the shapes
    ``QWEN3_SHAPES[name]`` (bf16 by default), built directly on ``device``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = QWEN3_SHAPES[name]
    config, model = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if "num_experts" in shape else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(0)
    with torch.device(device):
        return model(config(**shape)).to(dtype or torch.bfloat16)


def save_random_qwen3(name: str, out: Any) -> None:
    """Write ``random_qwen3(name)`` with a tokenizer of its own to the directory ``out``, for the
    benchmarks that run qadpipe's stages on it (they load a model directory with its tokenizer).

    The tokenizer is one word per id (``<t0>`` ... ``<t151935>``): random-token data needs
    nothing more, and it keeps the device machines free of the SmolLM2 package (not installed
    there, and too large to carry).  Built on the CPU: the weights are only saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = random_qwen3(name, "cpu")
    vocab = {f"<t{i}>": i for i in range(model.config.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<t0>", bos_token="<t1>",
                                        eos_token="<t2>", pad_token="<t3>")
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 3
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
