"""``pyloader.from_pretrained``: a transformers model built from its config straight on the device
(no random init) and filled by pyloader, quantized checkpoints (FP8, MXFP8, FP4, NVFP4, INT4)
dequantized on the fly into the model's dtype: the fast path to fine-tune a quantized release in
BF16.

Parameter names are transformers' own (``q_proj``, ``k_proj`` … as stored); the per-expert tensors
of a MoE checkpoint go into transformers 5's fused experts (``mlp.experts.gate_up_proj``
``[E, 2I, H]``: gate rows then up rows; ``mlp.experts.down_proj`` ``[E, H, I]``), as its own loader
puts them. Persistent buffers (DeepSeek's ``e_score_correction_bias``) are loaded; computed ones
(rotary ``inv_freq``) keep the values the model built.
"""

import logging
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..errors import PyloaderInputError
from ..format.checkpoint import open_checkpoint, read_json_object
from ..loading.loader import load
from ..routing.router import Rules

logger = logging.getLogger("pyloader")

_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = {"gate_proj": ("gate_up_proj", "w1"), "up_proj": ("gate_up_proj", "w3"), "down_proj": ("down_proj", "w2"),
          "w1": ("gate_up_proj", "w1"), "w3": ("gate_up_proj", "w3"), "w2": ("down_proj", "w2")}


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _folder(path: Union[str, Path], revision: Optional[str]) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision, allow_patterns=["*.safetensors", "*.json"]))


def hf_rules(names, targets: Dict[str, torch.Tensor], tied: bool) -> Rules:
    """Names route to themselves; per-expert tensors into the fused experts the model holds."""
    experts = []
    seen = set()
    for name in names:
        m = _EXPERT.search(name)
        if not m:
            continue
        fused, shard = _FUSED[m.group(2)]
        prefix = name[:m.start()]
        if f"{prefix}.experts.{fused}" not in targets:
            continue  # the model keeps experts as modules: the name routes to itself
        key = (int(m.group(1)), m.group(2))
        if key not in seen:
            seen.add(key)
            experts.append((f"experts.{fused}", f"experts.{m.group(1)}.{m.group(2)}.weight", int(m.group(1)), shard))
    experts.sort(key=lambda e: (e[2], e[3]))
    return Rules(expert_params_mapping=experts, tie_word_embeddings=tied)


def _keep_fp32(model, dtype: torch.dtype) -> None:
    """The modules a model keeps in float32 (``_keep_in_fp32_modules_strict`` always,
    ``_keep_in_fp32_modules`` under float16), as transformers' own loader does."""
    names = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not names or dtype == torch.float32:
        return
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, names)) + r")(\.|$)")
    for mod_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.is_floating_point() and pattern.search(f"{mod_name}.{name}".lstrip(".")):
                    f = t.detach().float()
                    store[name] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if store is module._parameters else f


def from_pretrained(path: Union[str, Path], dtype: torch.dtype = torch.bfloat16, device=None, *,
                    model_class=None, revision: Optional[str] = None, backend: Optional[str] = None,
                    progress: bool = True, unexpected: str = "error", missing: str = "error", **config_kwargs):
    """Build ``model_class`` (default ``AutoModelForCausalLM``) from the checkpoint's config in
    ``dtype`` on ``device`` (default: CUDA when present) without the checkpoint's quantization
    config, and fill it from ``path`` (a directory or a Hugging Face repo id) with pyloader,
    dequantizing quantized weights. Every checkpoint name must have a parameter and every parameter
    a source (else a :class:`~pyloader.errors.PyloaderInputError` listing them, with did-you-mean
    hints, before any weight is read). Returns the model in eval mode; ``model.pyloader_report``
    is the :class:`~pyloader.LoadReport`."""
    import transformers

    folder = _folder(path, revision)
    stored = read_json_object(folder / "config.json", "config") if (folder / "config.json").is_file() else {}
    config = transformers.AutoConfig.from_pretrained(str(folder), **config_kwargs)
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")  # the model computes in dtype; the loader reads the stored format
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cls = model_class or transformers.AutoModelForCausalLM
    with _no_init(), dev:
        model = cls.from_config(config, dtype=dtype)
    model.eval()
    _keep_fp32(model, dtype)
    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers, tied ones once each name
    tied = bool(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "tie_word_embeddings", False))
    targets = {n: t.detach() for n, t in state.items()}
    if tied and "lm_head.weight" in targets:
        targets.pop("lm_head.weight")  # the embedding's storage
    checkpoint = open_checkpoint(folder)
    rules = hf_rules(list(checkpoint.tensors), targets, tied)
    report = load(targets, folder, rules=rules, config=stored, backend=backend, progress=progress,
                  unexpected=unexpected, missing=missing)
    if tied:
        model.tie_weights()
    model.pyloader_report = report
    logger.info("pyloader.from_pretrained: %s", report.summary())
    return model
