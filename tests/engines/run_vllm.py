"""One vLLM engine run in its own process (vLLM starts workers and owns the process): greedy
tokens and top-k logprobs of fixed prompts, and each worker's digest of the parameters its loader
wrote, as one JSON line on stdout after ``RESULT``.

    python tests/engines/run_vllm.py MODEL_DIR '{"load_format": "pyloader", ...}'
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# apply_model ships the digest function to vLLM's workers pickled: this harness's own processes only
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
PROMPTS = [[1, 2, 3, 4, 5], [7, 300, 11], [42] * 9]


def _digest_what_the_loader_wrote():
    """vLLM's CPU linear layers hand their weights to packed GEMM kernels after loading and keep empty
    parameters, so the digest is taken just before that step, of what the loader wrote. At module
    level: vLLM's CPU backend spawns its engine and workers, which import this file again."""
    from vllm.model_executor.model_loader import base_loader

    from state_digest import state_digest

    original = base_loader.process_weights_after_loading

    def wrapped(model, *args, **kwargs):
        model._loaded_digest = state_digest(model)
        return original(model, *args, **kwargs)

    base_loader.process_weights_after_loading = wrapped


_digest_what_the_loader_wrote()

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(skip_tokenizer_init=True, enforce_eager=True, max_model_len=128, dtype="bfloat16", seed=0)
    kwargs.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    generate = kwargs.pop("generate", True)  # False: load (and digest) only, for models vLLM's CPU build cannot run
    llm = LLM(model=sys.argv[1], **kwargs)
    result = None
    if generate:
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=5, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        result = [{"tokens": list(o.outputs[0].token_ids),
                   "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]}
                  for o in outs]
    from state_digest import loaded_digest

    digests = llm.apply_model(loaded_digest)
    assert digests and all(digests), "no digest of the loaded weights came back"
    print("RESULT " + json.dumps({"generations": result, "digests": digests}), flush=True)
