"""Architectures by name. Adding one: a model file plus a line here."""
from __future__ import annotations

from ..config import ModelConfig
from .gemma3 import Gemma3Transformer
from .llama import Transformer

ARCHITECTURES: dict[str, type[Transformer]] = {"llama": Transformer, "gemma3": Gemma3Transformer}


def build_model(cfg: ModelConfig) -> Transformer:
    return ARCHITECTURES[cfg.arch](cfg)
