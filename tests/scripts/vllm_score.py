"""Score one token sequence with vLLM (CPU) and print its prompt log-probs as JSON.

Run as a subprocess by the slow tests: vLLM spawns workers, so it needs the main guard,
and keeping it out of the pytest process keeps the engine's memory out of the suite.
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir, token_ids = sys.argv[1], json.loads(sys.argv[2])
    from vllm import LLM, SamplingParams, TokensPrompt

    from qadpipe.teacher.vllm_backend import exit_now, shutdown_llm

    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=256, enforce_eager=True, max_logprobs=5)
    params = SamplingParams(max_tokens=1, prompt_logprobs=5, detokenize=False, temperature=0.0)
    (output,) = llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)
    rows = [None if row is None else {str(k): v.logprob for k, v in row.items()} for row in output.prompt_logprobs]
    print("RESULT " + json.dumps({"prompt_logprobs": rows, "next_token": output.outputs[0].token_ids[0]}))
    shutdown_llm(llm)
    exit_now(0)
