"""transformers teacher: the reference implementation, and the fallback without vLLM.

Top-k capture never builds the fp32 ``log_softmax`` of all ``[tokens, vocab]`` logits.
The decoder body runs once per batch; the LM head then runs over the gathered target
positions in chunks of ``chunk_tokens`` rows: logits (fp32 output) -> top-k -> minus the
row's logsumexp.  Only one ``[chunk, vocab]`` fp32 block is alive at a time, and nothing
is computed for padding or for prompt positions that are not distilled.

``fp32_head`` means bf16 weights and hidden states, fp32 accumulation *and output*
(``torch.mm(out_dtype=float32)`` on CUDA, an upcast on CPU): the logits are not rounded
to bf16 before the softmax, as vLLM's ``head_dtype=float32`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qadpipe.data.sequences import TokenSequence
from qadpipe.devices import resolve_device
from qadpipe.errors import ModelError, TeacherError
from qadpipe.models import LogitTransform, check_logits_are_head_of_hidden
from qadpipe.targets import SequenceTargets
from qadpipe.teacher.base import (Completion, SamplingSpec, TargetSpec, sampled_targets, target_start,
                                  topk_targets)
from qadpipe.teacher.sampling import counts_by_row, draw_indices, sequence_seed


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, *, fp32_head: bool,
                transform: LogitTransform) -> torch.Tensor:
    """``head`` (a Linear) on ``[n, hidden]`` rows -> fp32 ``[n, vocab]`` logits, then the
    architecture's ``transform`` (soft-capping, scaling); with ``fp32_head`` accumulated and
    written in fp32 (see the module docstring).  Outside any autocast, which would run the head
    in bf16 again.  Shared with distill's teacher in the loop, so online targets are the
    logits a cache would hold."""
    weight, bias = head.weight, getattr(head, "bias", None)
    with torch.autocast(hidden.device.type, enabled=False):
        if not fp32_head:
            logits = torch.nn.functional.linear(hidden, weight, bias).float()
        elif hidden.is_cuda and hidden.dtype != torch.float32:
            logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            logits = logits if bias is None else logits + bias.float()
        else:
            logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        return transform(logits)


def end_of_sequence_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every token a completion stops at, as vLLM stops: the tokenizer's EOS and each id the
    checkpoint's generation_config.json lists (an instruct model's end-of-turn, e.g. Gemma's
    <end_of_turn>, Llama-3's <|eot_id|>, is often only there)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else np.asarray(listed).reshape(-1).tolist()   # int, list or tensor
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tuple(dict.fromkeys(int(i) for i in ids + listed))


class HFTeacher:
    """A causal LM from transformers, scoring batches of right-padded sequences."""

    def __init__(self, model: Any, *, fp32_head: bool = True, batch_size: int = 8, chunk_tokens: int = 1024,
                 pad_id: int = 0, eos_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.body = model.get_decoder()   # the module check_logits_are_head_of_hidden checks, as distill runs it
        self.head = model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        self.fp32_head = fp32_head
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        try:   # this backend scores lm_head(hidden states) chunk-wise: another distribution otherwise
            self.transform = check_logits_are_head_of_hidden(model, "teacher")
        except ModelError as exc:
            raise TeacherError(f"{exc}; use teacher.backend=vllm") from None

    @classmethod
    def from_config(cls, path: str, teacher: Any, trust_remote_code: bool = False) -> "HFTeacher":
        """Load ``path`` with the ``teacher`` config section (dtype, device, batching)."""
        from qadpipe.models import load_causal_lm, load_tokenizer, padding_id

        device = resolve_device(teacher.device, field="teacher.device")
        model = load_causal_lm(path, teacher.dtype, str(device), trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code)
        return cls(model, fp32_head=teacher.fp32_head, batch_size=teacher.batch_size, chunk_tokens=teacher.chunk_tokens,
                   pad_id=padding_id(tokenizer, model), eos_ids=end_of_sequence_ids(model, tokenizer))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (and the architecture's logit transform) on ``[n, hidden]`` rows -> fp32 ``[n, vocab]``."""
        return head_logits(self.head, hidden, fp32_head=self.fp32_head, transform=self.transform)

    @torch.no_grad()
    def score(self, sequences: list[TokenSequence], spec: TargetSpec) -> list[SequenceTargets]:
        out: list[SequenceTargets] = []
        for first in range(0, len(sequences), self.batch_size):
            out.extend(self._score_batch(sequences[first:first + self.batch_size], spec))
        return out

    def _score_batch(self, batch: list[TokenSequence], spec: TargetSpec) -> list[SequenceTargets]:
        length = max(len(s.input_ids) for s in batch)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        starts, flat_rows = [], []
        for row, seq in enumerate(batch):
            ids[row, :len(seq.input_ids)] = torch.from_numpy(seq.input_ids.astype(np.int64))
            mask[row, :len(seq.input_ids)] = 1
            start = target_start(seq, spec.include_prompt)
            starts.append(start)
            # Position p predicts token p + 1: rows start .. T-2.
            flat_rows.append(torch.arange(start, len(seq.input_ids) - 1) + row * length)
        hidden = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                           use_cache=False).last_hidden_state   # a KV cache here is GBs never read
        rows = torch.cat(flat_rows).to(self.device)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        sizes = [len(r) for r in flat_rows]
        bounds = np.cumsum([0, *sizes])
        if spec.kind == "topk":
            top_ids, top_lps = self._topk(selected, spec.k)
            return [topk_targets(seq, start, top_ids[a:b], top_lps[a:b])
                    for seq, start, a, b in zip(batch, starts, bounds[:-1], bounds[1:])]
        uniforms = np.concatenate([np.random.default_rng(sequence_seed(spec.seed, seq.id)).random((n, spec.num_samples))
                                   for seq, n in zip(batch, sizes)] + [np.zeros((0, spec.num_samples))])

        def where(row: int) -> str:   # a target row of this batch -> its sequence and position
            i = int(np.searchsorted(bounds, row, side="right")) - 1
            return f"sequence {batch[i].id!r} position {starts[i] + row - int(bounds[i])}"

        draws = np.concatenate([draw_indices(torch.softmax(self.logits(selected[a:a + self.chunk_tokens]), -1),
                                             uniforms[a:a + self.chunk_tokens], lambda row, a=a: where(a + row))
                                for a in range(0, len(selected), self.chunk_tokens)]
                               + [np.zeros((0, spec.num_samples), np.int64)])   # a batch with no target rows
        out, first = [], 0
        for seq, start, n in zip(batch, starts, sizes):
            offsets, values, counts = counts_by_row(draws[first:first + n])
            out.append(sampled_targets(seq, start, offsets, values, counts))
            first += n
        return out

    def _topk(self, hidden: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunked: logits -> top-k -> minus logsumexp; returns int32 ids, fp32 log-probs."""
        ids, lps = [], []
        for first in range(0, hidden.shape[0], self.chunk_tokens):
            logits = self.logits(hidden[first:first + self.chunk_tokens])
            values, index = logits.topk(k, dim=-1)
            lps.append((values - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu())
            ids.append(index.to(torch.int32).cpu())
        if not ids:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        return torch.cat(ids).numpy(), torch.cat(lps).numpy()

    @torch.no_grad()
    def complete(self, prompts: list[TokenSequence], sampling: SamplingSpec) -> list[Completion]:
        """One prompt at a time (no left padding), seeded by prompt id: a completion does not
        depend on which other prompts share its batch or task.

        Sampled with ``sampling`` alone, as the vLLM backend's SamplingParams are: transformers
        fills every field a GenerationConfig leaves at its default from the checkpoint's
        generation_config.json (repetition_penalty, min_p, no_repeat_ngram_size ... as
        instruct models ship them), so the model's own is set aside for the call."""
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
            top_p=sampling.top_p if sampling.temperature > 0 else None, top_k=0,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=list(self.eos_ids) or None, pad_token_id=self.pad_id,
        )
        out = []
        devices = [self.device] if self.device.type == "cuda" else []
        shipped, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            for prompt in prompts:
                ids = torch.from_numpy(prompt.input_ids.astype(np.int64)).unsqueeze(0).to(self.device)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(sequence_seed(sampling.seed, prompt.id))
                    generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                    generation_config=config)
                out.append(Completion(generated[0, ids.shape[1]:].cpu().numpy().astype(np.int32)))
        finally:
            self.model.generation_config = shipped
        return out

    def close(self) -> None:
        self.model = self.body = self.head = None
