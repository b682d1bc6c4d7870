"""Architectures by name. Adding one: a model file plus a line here."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .gemma3 import Gemma3Transformer
from .llama import Rope, Transformer

ARCHITECTURES: dict[str, type[Transformer]] = {"llama": Transformer, "gemma3": Gemma3Transformer}


def build_model(cfg: ModelConfig) -> Transformer:
    return ARCHITECTURES[cfg.arch](cfg)


def model_from_state_dict(cfg: ModelConfig, state_dict: dict, quantized: bool = False) -> Transformer:
    """A model holding a checkpoint's tensors, built without random init (on the meta device, the tensors
    assigned in place): a GGUF file's own blocks (``quantized``, ``load_quantized_state_dict``) or Hugging Face
    weights (``load_hf_state_dict``); rope tables computed on the CPU. The caller moves it to a device."""
    with torch.device("meta"):
        model = build_model(cfg)
    if quantized:
        model.load_quantized_state_dict(state_dict)
    else:
        model.load_hf_state_dict(state_dict)
    for module in model.modules():
        if isinstance(module, Rope):
            module.rebuild("cpu")
    return model
