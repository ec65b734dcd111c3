"""Model resolution, the embedded SmolLM2 and the tokenizer fingerprint."""

from __future__ import annotations

import os
import random
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


def _tiny(model_type: str):
    import torch
    import transformers

    configs = {
        "llama": transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64),
        "qwen2": transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64),
        "gpt_neox": transformers.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        "opt": transformers.OPTConfig(num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
        "bloom": transformers.BloomConfig(n_layer=2, n_head=4),
        "falcon": transformers.FalconConfig(num_hidden_layers=2, num_attention_heads=4),
    }
    config = configs[model_type]
    config.vocab_size, config.hidden_size = 300, 32
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
def test_models_whose_mask_follows_position_restarts_may_pack(model_type: str):
    from qadpipe.models import check_packed_rows_are_isolated

    check_packed_rows_are_isolated(_tiny(model_type), "model.path")


@pytest.mark.parametrize("model_type", ["opt", "bloom", "falcon"])
def test_models_that_let_a_packed_row_see_the_one_before_it_may_not_pack(model_type: str):
    """Measured on transformers 5.19, the second row's hidden states (magnitude ~1) move with the
    row before it by ~0.5 in OPT, ~0.6 in Falcon, ~0.02 in Bloom, in fp32 and bf16 alike; not at
    all in Llama, Qwen2, GPT-NeoX, GPT-2."""
    from qadpipe.models import check_packed_rows_are_isolated

    with pytest.raises(ModelError, match=rf"^distill\.pack_length: model\.path's {model_type} lets a packed row "
                                         r"attend to the rows before it .*; set distill\.pack_length: null"):
        check_packed_rows_are_isolated(_tiny(model_type), "model.path")


def test_a_student_that_cannot_pack_is_refused_when_it_is_built_to_pack(tmp_path: Path):
    import torch

    from qadpipe.config import load_config
    from qadpipe.distill.student import build_student

    _tiny("opt").save_pretrained(tmp_path / "opt")
    config = load_config(None, [f"model.path={tmp_path / 'opt'}", "quant.preset=w4a16_int", "quant.group_size=32"])
    build_student(config, torch.device("cpu"))
    with pytest.raises(ModelError, match="^distill.pack_length: model.path's opt"):
        build_student(config, torch.device("cpu"), packed=True)


@pytest.mark.parametrize("damage", ["[1]", "null", "hidden_size", "heads"])
def test_a_damaged_config_json_is_one_line_naming_it_in_every_stage(tiny_llama_dir: Path, tmp_path: Path, damage):
    """Each gave a 55-73 line traceback (TypeError, huggingface_hub's StrictDataclass*Error)."""
    import json
    import shutil

    from qadpipe.teacher import teacher_info

    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    text = {"[1]": "[1]", "null": "null",
            "hidden_size": json.dumps({**config, "hidden_size": str(config["hidden_size"])}),
            "heads": json.dumps({**config, "num_attention_heads": 3})}[damage]
    (model / "config.json").write_text(text)
    for load in (lambda: load_tokenizer(str(model)), lambda: teacher_info(model), lambda: load_causal_lm(str(model))):
        with pytest.raises(ModelError) as info:
            load()
        assert str(info.value).startswith(f"{model}") and "\n" not in str(info.value)
    assert str(info.value).startswith(f"{model}: cannot load model (")
    with pytest.raises(ModelError, match=rf"^{model}/config.json: transformers cannot read it \("):
        load_tokenizer(str(model))


def test_tokenizer_fingerprint_covers_each_ids_token_and_the_special_tokens():
    """The same tokens under other ids read a cache's ids differently; the same vocabulary with
    another special-token set (another EOS, which qadpipe appends after each completion) writes
    other ids for the same record.  The order the vocabulary dict lists its entries in is not
    part of it."""
    from types import SimpleNamespace

    def fake(vocab, special):
        return SimpleNamespace(get_vocab=lambda: dict(vocab), all_special_tokens=list(special))

    base = fake({"a": 0, "b": 1, "</s>": 2}, ["</s>"])
    assert tokenizer_fingerprint(base) == tokenizer_fingerprint(fake({"</s>": 2, "b": 1, "a": 0}, ["</s>"]))
    assert tokenizer_fingerprint(base) != tokenizer_fingerprint(fake({"a": 1, "b": 0, "</s>": 2}, ["</s>"]))
    assert tokenizer_fingerprint(base) != tokenizer_fingerprint(fake({"a": 0, "b": 1, "</s>": 2}, ["b"]))


def _weights_dir(path: Path, weights: dict[str, bytes], config: str = '{"model_type": "llama"}') -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(config)
    for name, data in weights.items():
        (path / name).write_bytes(data)
    return path


def test_model_revision_reads_config_start_middle_end_and_size_of_every_weight_file(tmp_path: Path):
    """model_revision's documented sample: config.json, and each weight file's (.safetensors and
    .bin) name, size and 1 MiB at its start, middle and end.  Each change below is in exactly one
    of those, so each must change the revision; a byte outside all three samples does not."""
    from qadpipe.models import REVISION_SAMPLE_BYTES, model_revision

    size = 3 * REVISION_SAMPLE_BYTES   # samples [0, 1M), [1M, 2M), [2M, 3M)
    blob = random.Random(0).randbytes(size)

    def changed(at: int, data: bytes = blob) -> bytes:
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]

    base = model_revision(_weights_dir(tmp_path / "base", {"model.safetensors": blob}))
    variants = {
        "config": _weights_dir(tmp_path / "config", {"model.safetensors": blob}, '{"model_type": "llama", "x": 1}'),
        "start": _weights_dir(tmp_path / "start", {"model.safetensors": changed(10)}),
        "middle": _weights_dir(tmp_path / "middle", {"model.safetensors": changed(size // 2)}),
        "end": _weights_dir(tmp_path / "end", {"model.safetensors": changed(size - 10)}),
    }
    for what, path in variants.items():
        assert model_revision(path) != base, what
    zeros = bytes(size)   # the same bytes at every sample, only the size differs
    assert model_revision(_weights_dir(tmp_path / "z0", {"model.safetensors": zeros})) != \
        model_revision(_weights_dir(tmp_path / "z1", {"model.safetensors": zeros + bytes(1)}))
    bins = [model_revision(_weights_dir(tmp_path / f"bin{i}", {"pytorch_model.bin": data}))
            for i, data in enumerate([blob, changed(size // 2)])]
    assert bins[0] != bins[1]
    big = 5 * REVISION_SAMPLE_BYTES   # a byte at 1.2M: between the start and middle samples
    wide = random.Random(1).randbytes(big)
    between = changed(int(1.2 * REVISION_SAMPLE_BYTES), wide)
    assert model_revision(_weights_dir(tmp_path / "w0", {"model.safetensors": wide})) == \
        model_revision(_weights_dir(tmp_path / "w1", {"model.safetensors": between}))


def test_a_commit_named_directory_outside_a_hub_cache_is_known_by_its_content(tmp_path: Path):
    """Only ``models--<org>--<name>/snapshots/<40 hex>`` names its commit; the same layout
    without the ``models--`` parent is a directory like any other."""
    from qadpipe.models import model_revision

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = _weights_dir(tmp_path / "models--org--m" / "snapshots" / commit, {"model.safetensors": b"w" * 100})
    mine = _weights_dir(tmp_path / "my-runs" / "snapshots" / commit, {"model.safetensors": b"w" * 100})
    assert model_revision(hub) == f"snapshot:{commit}"
    assert model_revision(mine).startswith("sha256:")


def test_a_tenth_off_logits_are_refused_by_the_forward_check():
    """Logits 10% below lm_head(hidden) are another distribution (a temperature of 1.11): the
    forward check's tolerance is for dtype rounding, not for a transform that small."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qadpipe.models import check_logits_are_head_of_hidden

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.9
            return out

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ModelError, match=r"^teacher: llama's logits differ from lm_head\(hidden states\)"):
        check_logits_are_head_of_hidden(Scaled(config), "teacher")
