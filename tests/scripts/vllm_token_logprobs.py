"""Teacher-forced log-probs of fixed token sequences under vLLM (CPU), for several models.

Run as a subprocess by the export serving test: vLLM spawns workers, so it needs the main
guard.  All models are scored in one process, one engine after the other, so vLLM is
imported once.  Prints one ``RESULT`` JSON line: per model directory, per sequence, the
log-prob vLLM assigns to each actual next token (positions 1..n-1).
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Weight-only int4 runs as true W4A16 (the default W4A8 path quantizes activations).
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    request = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams, TokensPrompt

    from qadpipe.export.serve_check import vllm_engine_args
    from qadpipe.teacher.vllm_backend import exit_now, shutdown_llm, use_private_ipc_dir

    use_private_ipc_dir()

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["sequences"]]
    results = {}
    for model_dir in request["models"]:
        llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=request.get("max_model_len", 256),
                  enforce_eager=True, max_logprobs=1, seed=0, **vllm_engine_args(model_dir))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[model_dir] = [
            [row[token].logprob for row, token in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outputs, request["sequences"])
        ]
        shutdown_llm(llm)
        del llm
    print("RESULT " + json.dumps(results))
    exit_now(0)
