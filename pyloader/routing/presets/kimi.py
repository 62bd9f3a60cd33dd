"""Kimi-K2.5 / K2.6 (``kimi_k25``): a DeepSeek-V3 language model under ``language_model.``, the
MoonViT vision tower and its projector passed through."""

from .builder import Preset, language_config, language_model_under

KIMI_PASSTHROUGH = ("vision_tower.", "mm_projector.")


def kimi_language_config(c: dict) -> dict:
    """The DeepSeek-V3 config of a Kimi-K2.5 model (``text_config``), with the outer dtype."""
    return language_config(c, "deepseek_v3")


def kimi_k25(lm: Preset, dtype) -> Preset:
    return language_model_under(lm, "kimi_k25", "language_model.", KIMI_PASSTHROUGH, dtype)
