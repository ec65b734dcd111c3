"""Architectures with a transform after the LM head (Gemma 2 soft-capping, Granite's and
Cohere's scaling): qadpipe's chunked heads -- the HF teacher, the fused training loss, eval --
apply it, checked against each model's own full forward (transformers' code, independent of
qadpipe's).  The soft-cap is set small so that it changes the logits of a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qadpipe.models import LogitTransform, check_logits_are_head_of_hidden

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**SMALL, final_logit_softcapping=0.5))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = {k: v for k, v in SMALL.items() if k != "head_dim"}
    return GraniteForCausalLM(GraniteConfig(**config, logits_scaling=0.125))


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    config = {k: v for k, v in SMALL.items() if k != "head_dim"}
    return CohereForCausalLM(CohereConfig(**config, logit_scale=8.0))


MODELS = {"gemma2": (_gemma2, LogitTransform(softcap=0.5)), "granite": (_granite, LogitTransform(scale=8.0)),
          "cohere": (_cohere, LogitTransform(scale=8.0))}


@pytest.fixture(params=list(MODELS), scope="module")
def transformed(request):
    torch.manual_seed(0)
    build, expected = MODELS[request.param]
    model = build().eval()
    with torch.no_grad():   # peaked enough that a missing transform is far outside the tolerances
        model.get_output_embeddings().weight.mul_(20)
    return model, expected


def _ids(model, rows: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))


def _reference_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), dim=-1)


def test_the_check_returns_the_transform_the_config_names(transformed):
    model, expected = transformed
    assert check_logits_are_head_of_hidden(model, "model.path") == expected


def _config(model_type: str, **fields):
    from transformers import PretrainedConfig

    config = PretrainedConfig(**fields)
    config.model_type = model_type
    return config


@pytest.mark.parametrize("model_type,fields,expected", [
    ("gemma2", {"final_logit_softcapping": 1.0}, LogitTransform(softcap=1.0)),   # c = 1 is no identity
    ("granite", {"logits_scaling": 4.0}, LogitTransform(scale=0.25)),            # Granite divides
    ("granitemoe", {"logits_scaling": 4.0}, LogitTransform(scale=0.25)),
    ("cohere2", {"logit_scale": 0.0625}, LogitTransform(scale=0.0625)),
    ("granite", {"logits_scaling": 1.0}, LogitTransform()),
    ("llama", {}, LogitTransform()),
])
def test_config_fields_map_to_what_each_family_computes(model_type, fields, expected):
    from qadpipe.models import logit_transform

    assert logit_transform(_config(model_type, **fields)) == expected


@pytest.mark.parametrize("model_type,fields", [
    ("mpt", {"logit_scale": "inv_sqrt_d_model"}),          # a string, not a number
    ("hyperclovax", {"logits_scaling": 0.5}),              # multiplies by the field Granite divides by
    ("falcon_h1", {"lm_head_multiplier": 0.5}),
    ("gemma2", {"final_logit_softcapping": 30.0, "logits_scaling": 2.0}),   # two: their order unknown
    ("granite", {"final_logit_softcapping": 30.0, "logits_scaling": 2.0}),  # two known ones: still no order
])
def test_other_transforms_are_refused_in_one_line(model_type, fields):
    from qadpipe.errors import ModelError
    from qadpipe.models import logit_transform

    with pytest.raises(ModelError) as info:
        logit_transform(_config(model_type, **fields), "teacher.path")
    message = str(info.value)
    assert message.startswith(f"teacher.path: {model_type} sets ") and "not supported" in message
    assert "\n" not in message


def test_hf_teacher_topk_is_the_models_own_distribution(transformed):
    from qadpipe.data.sequences import TokenSequence
    from qadpipe.teacher.base import TargetSpec
    from qadpipe.teacher.hf_backend import HFTeacher

    model, _ = transformed
    ids = _ids(model)
    got = HFTeacher(model, batch_size=2, chunk_tokens=5).score(
        [TokenSequence(f"s{i}", row.numpy().astype(np.int32), 0) for i, row in enumerate(ids)], TargetSpec(k=8))
    reference = _reference_logprobs(model, ids)
    for row, targets in enumerate(got):
        values, index = reference[row, :-1].topk(8)
        assert np.array_equal(targets.topk_ids, index.numpy())
        np.testing.assert_allclose(targets.topk_logprobs, values.numpy(), atol=1e-4)


def test_training_loss_and_its_gradient_use_the_models_own_logits(transformed):
    from qadpipe.distill.head_loss import LossSpec, PositionTargets
    from qadpipe.distill.student import StudentLoss

    model, _ = transformed
    ids = _ids(model)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, -1] = False
    targets = PositionTargets(next_tokens=torch.roll(ids, -1, dims=1)[mask])
    loss, _ = StudentLoss(model, chunk_tokens=7)({"input_ids": ids, "use_cache": False}, mask, targets,
                                                 LossSpec(mode="qat"))
    loss.backward()
    ours = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits[mask]
    want = torch.nn.functional.cross_entropy(logits.float(), targets.next_tokens, reduction="sum")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, model.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-5)
    model.zero_grad()


def test_eval_perplexity_is_the_models_own(transformed):
    from qadpipe.eval.runner import compare_to_teacher

    model, _ = transformed
    ids = _ids(model)
    figures = compare_to_teacher(model, {}, ids.tolist(), pad_id=0, chunk_tokens=5)["teacher"]
    reference = _reference_logprobs(model, ids)
    nll = -reference[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert figures["ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)


def test_generate_refuses_a_transform_it_does_not_apply_before_making_the_cache(tiny_llama_dir, tmp_path):
    """Falcon-H1's lm_head_multiplier (or two transforms at once): the HF backend cannot score
    such a teacher; said in one line from its config, before the cache directory exists."""
    import json
    import shutil

    from click.testing import CliRunner

    from qadpipe.cli import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "lm_head_multiplier": 0.5}))
    settings = [f"model.path={model}", "teacher.backend=hf", "data.source=random", "data.random.num_sequences=2",
                "data.random.length=8", f"cache.path={tmp_path / 'cache'}"]
    result = CliRunner().invoke(cli, ["generate", *[a for s in settings for a in ("--set", s)]])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "qadpipe: error: teacher: llama sets lm_head_multiplier=0.5, a transform after the LM head that qadpipe's "
        "chunked head does not apply; this architecture is not supported; use teacher.backend=vllm")
    assert not (tmp_path / "cache").exists()


def test_hf_teacher_sampled_targets_draw_from_the_models_own_distribution(transformed):
    """Sampled targets too: each row's draws are the inverse CDF (float64, side='right') of
    the model's own softmax at the sequence's seeded uniforms -- the transformed logits, not
    lm_head(hidden) alone."""
    from qadpipe.data.sequences import TokenSequence
    from qadpipe.teacher.base import TargetSpec
    from qadpipe.teacher.hf_backend import HFTeacher
    from qadpipe.teacher.sampling import sequence_seed

    model, _ = transformed
    ids = _ids(model)
    seqs = [TokenSequence(f"s{i}", row.numpy().astype(np.int32), 0) for i, row in enumerate(ids)]
    got = HFTeacher(model, batch_size=2, chunk_tokens=5).score(seqs, TargetSpec(kind="sampled", num_samples=40, seed=2))
    probs = _reference_logprobs(model, ids).exp().numpy()
    for row, (seq, targets) in enumerate(zip(seqs, got)):
        uniforms = np.random.default_rng(sequence_seed(2, seq.id)).random((ids.shape[1] - 1, 40))
        for position, (p, u) in enumerate(zip(probs[row, :-1], uniforms)):
            cdf = np.cumsum(p)
            want = np.unique(np.searchsorted(cdf, u * cdf[-1], side="right"), return_counts=True)
            a, b = targets.sample_offsets[position], targets.sample_offsets[position + 1]
            assert targets.sample_ids[a:b].tolist() == want[0].tolist()
            assert targets.sample_counts[a:b].tolist() == want[1].tolist()
