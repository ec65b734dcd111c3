"""Model resolution, the embedded SmolLM2 and the tokenizer fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qadpipe.errors import ModelError
from qadpipe.models import load_causal_lm, load_tokenizer, resolve_model_path, tokenizer_fingerprint



def test_missing_model_dir_is_one_clear_error(tmp_path: Path):
    with pytest.raises(ModelError, match=r"^model\.path '.*nope': expected a local Hugging Face directory or the alias"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match=r"no config.json, expected a Hugging Face model directory$"):
        resolve_model_path(str(tmp_path))


def test_tokenizer_fingerprint_tells_vocabularies_apart(tiny_llama_dir: Path, tmp_path: Path):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    same = load_tokenizer(str(tiny_llama_dir))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(same)
    same.add_tokens(["<qadpipe-new-token>"])
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(same)


@pytest.mark.slow
def test_embedded_smollm2_knows_paris(smollm2_dir: Path):
    import torch

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m")
    assert resolve_model_path("smollm2-135m") == smollm2_dir
    assert tokenizer.chat_template  # chat prompts render with the model's own template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


@pytest.mark.slow
def test_concurrent_conversions_share_one_directory(tmp_path: Path):
    """Two processes converting at once: one converts, the other waits; nobody sees half a dir."""
    code = "from qadpipe.models import embedded_smollm2_dir; print(embedded_smollm2_dir())"
    env = dict(os.environ, QADPIPE_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    model_dir = Path(paths.pop())
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_logits_transformed_after_the_head_are_refused_by_field_or_by_forward():
    """The fused loss, the HF teacher and eval run lm_head on hidden states and apply nothing
    after it. Falcon-H1 multiplies its logits by lm_head_multiplier, a field the check did not
    know; a model whose transform no field names is caught by comparing one forward."""
    import torch
    from transformers import FalconH1Config, FalconH1ForCausalLM, LlamaConfig, LlamaForCausalLM

    from qadpipe.models import check_logits_are_head_of_hidden

    torch.manual_seed(0)
    falcon = FalconH1ForCausalLM(FalconH1Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=16, mamba_chunk_size=16, lm_head_multiplier=0.0390625))
    with pytest.raises(ModelError, match=r"^model\.path: falcon_h1 sets lm_head_multiplier=0\.0390625"):
        check_logits_are_head_of_hidden(falcon, "model.path")

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.04
            return out

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    check_logits_are_head_of_hidden(LlamaForCausalLM(config), "teacher")     # plain: accepted
    with pytest.raises(ModelError, match=r"^teacher: llama's logits differ from lm_head\(hidden states\)"):
        check_logits_are_head_of_hidden(Scaled(config), "teacher")
