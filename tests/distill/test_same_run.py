"""What --resume (and the demo, through the same function) counts as another run."""

from __future__ import annotations

from qadpipe.config import config_to_dict, load_config
from qadpipe.distill.same_run import RESUMABLE_CHANGES, distill_reads, unresumable_changes


def _reads_from_cache(key: str) -> bool:
    return distill_reads(key, teacher_in_loop=False, tokens_from_data=False)


def test_a_run_from_a_cache_reads_model_quant_and_distill_only():
    assert _reads_from_cache("quant.preset") and _reads_from_cache("model.path")
    assert not _reads_from_cache("teacher.path")        # the cache holds what the teacher said
    assert not _reads_from_cache("data.source")         # ... on which tokens
    assert not _reads_from_cache("cache.path")          # a moved cache is known by its fingerprint
    assert distill_reads("teacher.dtype", teacher_in_loop=True, tokens_from_data=False)
    assert not distill_reads("teacher.max_model_len", teacher_in_loop=True, tokens_from_data=False)
    assert distill_reads("data.source", teacher_in_loop=True, tokens_from_data=True)


def test_only_read_fields_outside_the_resumable_ones_make_another_run():
    recorded = config_to_dict(load_config(None, []))
    assert unresumable_changes(recorded, load_config(None, ["distill.max_steps=7", "distill.lr=0.5",
                                                            "generate.temperature=0.3"]), _reads_from_cache) == []
    assert unresumable_changes(recorded, load_config(None, ["quant.preset=mxfp4", "distill.seed=3"]),
                               _reads_from_cache) == ["quant.preset", "distill.seed"]
    assert "distill.max_steps" in RESUMABLE_CHANGES


def test_a_field_the_record_predates_counts_as_what_that_version_did():
    """Records from before quant.moe_experts existed trained experts dense, whatever today's default."""
    recorded = config_to_dict(load_config(None, []))
    del recorded["quant"]["moe_experts"]
    assert unresumable_changes(recorded, load_config(None, []), _reads_from_cache) == ["quant.moe_experts"]
    assert unresumable_changes(recorded, load_config(None, ["quant.moe_experts=dense"]), _reads_from_cache) == []
    del recorded["distill"]["seed"]            # a field with no recorded past: today's default
    assert unresumable_changes(recorded, load_config(None, ["quant.moe_experts=dense"]), _reads_from_cache) == []


def test_an_lsq_student_recorded_before_lsq_grid_took_the_full_grid():
    """learnable: lsq moved w4a16_int to [-8, 7] before quant.lsq_grid: its record rebuilds so,
    and resuming it on today's default grid is another run; other records are unaffected."""
    lsq = config_to_dict(load_config(None, ["quant.learnable=lsq"]))
    del lsq["quant"]["lsq_grid"]
    assert unresumable_changes(lsq, load_config(None, ["quant.learnable=lsq"]), _reads_from_cache) \
        == ["quant.lsq_grid"]
    assert unresumable_changes(lsq, load_config(None, ["quant.learnable=lsq", "quant.lsq_grid=full"]),
                               _reads_from_cache) == []
    plain = config_to_dict(load_config(None, []))
    del plain["quant"]["lsq_grid"]
    assert unresumable_changes(plain, load_config(None, []), _reads_from_cache) == []
