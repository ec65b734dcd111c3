"""One vLLM (CPU) engine on SmolLM2, several stage-one checks; results go to OUT_DIR.

Run as a subprocess by tests/teacher/test_vllm_backend.py (vLLM spawns workers: main guard;
one engine start costs 30-60 s here, so every check shares it):

1. ``qadpipe generate`` in score mode (plain encoding) -> OUT_DIR/score-cache
2. ``qadpipe generate`` in generate mode at temperature 0.5 -> OUT_DIR/gen-cache
3. the completions that run drew, as vLLM returned them (token ids and text) -> completions.json
4. decode-time log-probs of a T=0.5 sampled completion (raw_logprobs) -> decode_logprobs.npz
5. the texts' prompt log-probs from this engine (qadpipe's fused path, the default) and from a
   second engine on vLLM's own log_softmax path -> fused_vs_stock.npz
"""

import dataclasses
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir, text_file, prompt_file, out_dir = sys.argv[1:5]
    import numpy as np
    from vllm import SamplingParams, TokensPrompt

    from qadpipe.config import build_config
    from qadpipe.data import load_sequences
    from qadpipe.generate import run_generate
    from qadpipe.models import load_tokenizer
    from qadpipe.teacher.vllm_backend import VLLMTeacher, exit_now, shutdown_llm

    K = 32
    common = {"model": {"path": model_dir}, "cache": {"k": K, "encoding": "plain"},
              "teacher": {"backend": "vllm", "enforce_eager": True, "max_num_batched_tokens": 1024}}
    score_cfg = build_config({**common, "data": {"source": text_file, "max_length": 256},
                              "cache": {**common["cache"], "path": f"{out_dir}/score-cache"}})
    gen_cfg = build_config({**common, "data": {"source": prompt_file, "field": "prompt", "chat_template": True,
                                               "max_length": 160},
                            "generate": {"mode": "generate", "temperature": 0.5, "top_p": 1.0,
                                         "max_new_tokens": 48, "seed": 3},
                            "cache": {**common["cache"], "path": f"{out_dir}/gen-cache"}})
    teacher = VLLMTeacher.from_config(model_dir, score_cfg.teacher, k=K, longest_sequence=256)

    completed = []

    class Shared:
        """The one engine, lent to each run (run_generate closes its teacher at the end); keeps
        the completions vLLM returns, with their text, as the run stores them."""

        def __getattr__(self, name):
            return getattr(teacher, name)

        def complete(self, prompts, sampling):
            completions = teacher.complete(prompts, sampling)
            completed.extend(zip(prompts, completions))
            return completions

        def close(self):
            pass

    run_generate(score_cfg, teacher_factory=lambda *a, **kw: Shared())
    run_generate(gen_cfg, teacher_factory=lambda *a, **kw: Shared())

    tokenizer = load_tokenizer(model_dir)
    prompts = load_sequences(gen_cfg.data, gen_cfg.generate, tokenizer, len(tokenizer)).sequences
    # Not a second call with the same seed: on an AMX CPU the bf16 forward differs between calls
    # (batch shape, prefix cache), and a temperature-0.5 draw may then part ways mid-completion.
    with open(f"{out_dir}/completions.json", "w") as handle:
        json.dump([{"id": p.id, "prompt_ids": p.input_ids.tolist(), "token_ids": c.token_ids.tolist(),
                    "text": c.text} for p, c in completed], handle)

    # Decode-time log-probs (path "a" of the notes) at T=0.5: raw_logprobs must be the T=1 values.
    params = SamplingParams(temperature=0.5, max_tokens=24, seed=11, logprobs=K, flat_logprobs=True,
                            detokenize=False)
    out = teacher.llm.generate([TokensPrompt(prompt_token_ids=prompts[0].input_ids.tolist())], params,
                               use_tqdm=False)[0].outputs[0]
    flat = out.logprobs
    n = len(out.token_ids)
    ids = np.asarray(flat.token_ids, np.int32).reshape(n, K + 1)
    lps = np.asarray(flat.logprobs, np.float32).reshape(n, K + 1)
    np.savez(f"{out_dir}/decode_logprobs.npz", prompt=prompts[0].input_ids, completion=np.asarray(out.token_ids),
             ids=ids, logprobs=lps)
    texts = load_sequences(score_cfg.data, score_cfg.generate, tokenizer, len(tokenizer)).sequences
    stock_teacher = VLLMTeacher.from_config(model_dir, dataclasses.replace(score_cfg.teacher, fused_logprobs=False),
                                            k=K, longest_sequence=256)
    # One sequence per call: how many requests the scheduler batches into a step depends on
    # timing, and another batch shape rounds the bf16 forward differently (seen: up to 0.3 nats
    # between the engines on 5 of 12 texts).  Alone, each text gets the same forward on both.
    fused = [teacher.prompt_logprobs([text])[0] for text in texts]
    stock = [stock_teacher.prompt_logprobs([text])[0] for text in texts]
    np.savez(f"{out_dir}/fused_vs_stock.npz", fused_ids=np.concatenate([i for i, _ in fused]),
             fused_lps=np.concatenate([lp for _, lp in fused]), stock_ids=np.concatenate([i for i, _ in stock]),
             stock_lps=np.concatenate([lp for _, lp in stock]))
    shutdown_llm(stock_teacher.llm)
    shutdown_llm(teacher.llm)
    print("CHECKS DONE")
    exit_now(0)   # after two engines the static destructors can still abort the exit (SIGABRT)
