"""One vLLM engine run in its own process (vLLM starts workers and owns the process): greedy
tokens and top-k logprobs of fixed prompts as one JSON line on stdout after ``RESULT``.

    python tests/engines/run_vllm.py MODEL_DIR '{"load_format": "pyloader", ...}'
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
PROMPTS = [[1, 2, 3, 4, 5], [7, 300, 11], [42] * 9]

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, dtype="bfloat16", seed=0)
    kwargs.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    llm = LLM(model=sys.argv[1], **kwargs)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=5, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    result = [{"tokens": list(o.outputs[0].token_ids),
               "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}
              for o in outs]
    print("RESULT " + json.dumps(result), flush=True)
