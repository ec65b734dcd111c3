"""The one interface both teacher backends implement, and the target assembly they share.

A backend turns token sequences into :class:`~qadpipe.targets.SequenceTargets`; in
generate mode it first writes completions.  Everything that is not backend-specific
(which rows are targets, how draws become ids + counts) lives here, so the two backends
differ only where their engines differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from qadpipe.data.sequences import TokenSequence
from qadpipe.targets import SequenceTargets


@dataclass(frozen=True)
class TargetSpec:
    """What to capture per position: top-``k`` log-probs, or ``num_samples`` draws."""

    kind: str = "topk"
    k: int = 64
    num_samples: int = 50
    seed: int = 0
    include_prompt: bool = True


@dataclass(frozen=True)
class SamplingSpec:
    """How the teacher writes completions in generate mode (targets stay raw T=1)."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    """A completion the teacher wrote: its token ids (EOS included when it stopped there)
    and, where the engine returns it, its text."""

    token_ids: np.ndarray
    text: str | None = None


class Teacher(Protocol):
    """A teacher backend (vLLM or transformers)."""

    vocab_size: int

    def score(self, sequences: list[TokenSequence], spec: TargetSpec) -> list[SequenceTargets]:
        """Targets for every sequence, in input order."""
        ...

    def complete(self, prompts: list[TokenSequence], sampling: SamplingSpec) -> list[Completion]:
        """One sampled completion per prompt, in input order; seeded per prompt id."""
        ...

    def close(self) -> None:
        ...


def target_start(sequence: TokenSequence, include_prompt: bool) -> int:
    """First target row's position: 0, or the last prompt token (whose row predicts the
    first completion token) when prompt positions are not distilled."""
    return 0 if include_prompt else max(sequence.prompt_len - 1, 0)


def with_completion(prompt: TokenSequence, completion: Completion) -> TokenSequence:
    """The prompt + completion sequence that gets scored (same id: one row per prompt)."""
    ids = np.concatenate([prompt.input_ids, completion.token_ids.astype(np.int32)])
    return replace(prompt, input_ids=ids, prompt_len=len(prompt.input_ids))


def topk_targets(sequence: TokenSequence, start: int, ids: np.ndarray, logprobs: np.ndarray) -> SequenceTargets:
    """Top-k targets from rows already restricted to ``start..T-2``."""
    from qadpipe.targets import tail_mass_from_logprobs

    return SequenceTargets(
        id=sequence.id, input_ids=sequence.input_ids, target_start=start,
        topk_ids=np.ascontiguousarray(ids, dtype=np.int32),
        topk_logprobs=np.ascontiguousarray(logprobs, dtype=np.float32),
        tail_mass=tail_mass_from_logprobs(logprobs),
    )


def sampled_targets(sequence: TokenSequence, start: int, offsets: np.ndarray, ids: np.ndarray,
                    counts: np.ndarray) -> SequenceTargets:
    return SequenceTargets(
        id=sequence.id, input_ids=sequence.input_ids, target_start=start,
        sample_offsets=offsets.astype(np.int64), sample_ids=ids.astype(np.int32),
        sample_counts=counts.astype(np.int32),
    )
