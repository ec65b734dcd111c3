"""--format fake: an ordinary HF checkpoint holding Q(W) that transformers loads as is."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qadpipe.export import export_model
from qadpipe.export.model_tensors import quant_linears
from qadpipe.quant.formats import Kind, QuantSpec
from qadpipe.quant.quantizers import QuantLinear


@pytest.mark.parametrize("preset,group", [("w4a16_int_asym", 32), ("nvfp4_a16", None), ("mxfp4_a16", None)])
def test_fake_export_loads_and_computes_what_the_student_computes(student, tiny_llama_dir, tmp_path, preset, group):
    """Weight-only recipes: the loaded fake checkpoint's logits equal the fake-quant student's
    bit for bit (same bf16 weights, same ops), and its weights are exactly Q(W)."""
    model, config = student(tiny_llama_dir, preset, group)
    out = tmp_path / "fake"
    export_model(model, tiny_llama_dir, out, "fake", config)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    assert not hasattr(loaded.config, "quantization_config")
    for name, layer in quant_linears(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.fake_quantized_weight()), name
        assert not torch.equal(loaded.get_submodule(name).weight, layer.weight), f"{name} was not quantized"
    ids = torch.randint(0, loaded.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_quantized_source_models_quantization_config_is_not_carried_over(student, tiny_llama_dir, tmp_path):
    """A student of an FP8 release (its config.json holds a quantization_config): the fake
    checkpoint holds BF16 weights, which vLLM would read as FP8 ones under that config."""
    import shutil

    source = tmp_path / "fp8-release"
    shutil.copytree(tiny_llama_dir, source)
    config_json = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config_json, "quantization_config": {"quant_method": "fp8"}}))
    model, config = student(tiny_llama_dir, "w4a16_int", 32)
    export_model(model, source, tmp_path / "fake", "fake", config)
    written = json.loads((tmp_path / "fake" / "config.json").read_text())
    assert "quantization_config" not in written and written["architectures"] == ["LlamaForCausalLM"]


def test_fake_export_carries_tokenizer_chat_template_and_generation_config(student, smollm2_dir, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "w4a16_int", 32)
    out = tmp_path / "fake"
    export_model(model, tiny_llama_dir, out, "fake", config)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    reference = AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        reference.apply_chat_template(messages, tokenize=False)
    assert (out / "generation_config.json").read_text() == (tiny_llama_dir / "generation_config.json").read_text()
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["architectures"] == ["LlamaForCausalLM"]


def test_fake_export_unties_a_quantized_head(student, tiny_tied_llama_dir, tmp_path):
    """A quantized head tied to the embeddings serves Q(W) while the embedding keeps W: the
    fake checkpoint writes both and says so in its config."""
    model, config = student(tiny_tied_llama_dir, "w4a16_int", 32)
    model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec(Kind.INT, 4, group_size=32), None)
    out = tmp_path / "fake"
    export_model(model, tiny_tied_llama_dir, out, "fake", config)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert loaded.config.tie_word_embeddings is False
    assert torch.equal(loaded.lm_head.weight, model.lm_head.fake_quantized_weight())
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_a_head_tied_by_the_architectures_default_is_written_once(student, smollm2_dir, tmp_path):
    """Gemma ties by default and its hub configs leave tie_word_embeddings out: the raw JSON
    said untied, the shared storage was written twice and safetensors refused it (a traceback)."""
    from safetensors.torch import load_file
    from transformers import GemmaConfig, GemmaForCausalLM

    source = tmp_path / "gemma"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    torch.manual_seed(0)
    GemmaForCausalLM(GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    config_json = json.loads((source / "config.json").read_text())
    config_json.pop("tie_word_embeddings", None)
    (source / "config.json").write_text(json.dumps(config_json))
    model, config = student(source, "w4a16_int", 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for fmt in ("fake", "compressed-tensors"):
        export_model(model, source, tmp_path / fmt, fmt, config)
        tensors = load_file(str(tmp_path / fmt / "model.safetensors"))
        assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors


def test_tied_dense_head_is_written_once(student, tiny_tied_llama_dir, tmp_path):
    from safetensors.torch import load_file

    model, config = student(tiny_tied_llama_dir, "w4a16_int", 32)
    for fmt in ("fake", "compressed-tensors"):
        out = tmp_path / fmt
        export_model(model, tiny_tied_llama_dir, out, fmt, config)
        tensors = load_file(str(out / "model.safetensors"))
        assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("preset,group,said", [("w8a8_int", None, True), ("w4a16_int", 32, False)])
def test_a_fake_export_of_int8_weights_says_bf16_rounds_them(student, tiny_llama_dir, tmp_path, caplog, preset, group,
                                                            said):
    """bf16 holds an int4 code times its scale to < 0.02 of a step, an int8 one only to ~0.4."""
    model, config = student(tiny_llama_dir, preset, group, dtype="float32")
    export_model(model, tiny_llama_dir, tmp_path / "fake", "fake", config)
    assert ("8-bit integer weights" in caplog.text) is said
    worst = 0.0
    for layer in quant_linears(model).values():
        exact = layer.fake_quantized_weight()
        scale = layer.quantized_weight().scale.float()
        step = scale.repeat_interleave(exact.shape[1] // scale.shape[-1], -1)
        worst = max(worst, float(((exact.to(torch.bfloat16).float() - exact).abs() / step).max()))
    assert (worst > 0.1) is said and worst < 0.5, worst
