"""A SHA-256 of every parameter and buffer of a model, so two loaders can be compared byte for byte
(taken inside vLLM's workers by run_vllm.py)."""

import hashlib


def state_digest(model) -> dict:
    import torch

    out = {}
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            t = t.detach().contiguous().cpu()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[f"{kind}:{name}"] = f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(raw).hexdigest()
    return out


def loaded_digest(model):
    """The digest run_vllm.py took of ``model`` as its loader left it (None: none was taken)."""
    return getattr(model, "_loaded_digest", None)
