"""tachy: fast, lossless text generation for open causal language models.

    >>> import tachy
    >>> engine = tachy.load("smollm2-135m")              # or a GGUF file / Hugging Face folder
    >>> engine.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=32)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .decoding import GenerationConfig
from .engine import Engine
from .generation import GenerationResponse, GenerationStats
from . import kernels
from .errors import ContextLengthError, InvalidArgumentError, ModelLoadError, TachyError, UnknownNameError
from .sampling import SamplingConfig

__all__ = ["load", "Engine", "GenerationConfig", "GenerationResponse", "GenerationStats", "SamplingConfig",
           "TachyError", "ModelLoadError", "UnknownNameError", "ContextLengthError", "InvalidArgumentError"]
__version__ = "0.1.0"


def default_dtype(device: torch.device, path: Path | None = None) -> str:
    """A GGUF file's own blocks on a CPU where tachy's kernels run natively (AVX-512 with BF16 and VNNI, or
    AVX2); else bf16 where the hardware has fast bf16 matmuls (CUDA, AVX512-BF16/AMX CPUs), else fp32."""
    if device.type == "cuda":
        return "bf16"
    if path is not None and path.is_file() and kernels.runs_gguf_natively():
        return "gguf"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def resolve_device(device: str | None) -> torch.device:
    """The torch device to run on: CUDA when present unless told otherwise; a device this machine or this
    PyTorch build lacks is an InvalidArgumentError here rather than a traceback deep inside ``.to()``."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgumentError(f"device {device!r}: no CUDA device here (or this PyTorch build has no "
                                       f"CUDA); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InvalidArgumentError(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "mps"):
        raise InvalidArgumentError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def load(name_or_path: str | Path | None = None, dtype: str | None = None, device: str | None = None,
         max_context: int | None = None, progress: bool = True) -> Engine:
    """Load a named model (see ``tachy models``), a GGUF file or a Hugging Face folder into an Engine.

    dtype: "fp32", "bf16", "int8" or "int4" weights, or "gguf": a GGUF file's own quantized blocks
    (default: gguf for a GGUF file where tachy's CPU kernels run natively, else bf16 where fast, else fp32).
    max_context: cap the context window (saves rope-table memory on long-context models).
    """
    from .models import model_from_state_dict
    from .models.cpu_forward import CPUForward
    from .models.load import load_checkpoint
    from .models.quant import WEIGHT_DTYPES, convert_weights
    from .registry import DEFAULT_MODEL, resolve_model
    from .tokenizer import Tokenizer

    path = resolve_model(str(name_or_path or DEFAULT_MODEL))
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev, path)
    if dtype not in WEIGHT_DTYPES:
        raise InvalidArgumentError(f"unknown weight dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
    quantized = dtype == "gguf"
    cfg, state_dict, tokenizer_dir = load_checkpoint(path, progress=progress, quantized=quantized)
    if max_context:
        cfg.max_seq_len = min(cfg.max_seq_len, max_context)
    model = model_from_state_dict(cfg, state_dict, quantized)
    model = model.to(dev) if quantized else convert_weights(model.to(dev), dtype)
    model = model.eval()
    # the whole forward in one C call: GGUF blocks on AVX-512 or AVX2, bf16 weights on AVX512-BF16
    if kernels.has_avx512_bf16() or (quantized and kernels.runs_gguf_natively()):
        model.cpu_forward = CPUForward.build(model)
    tokenizer = Tokenizer.from_path(tokenizer_dir)
    name = str(name_or_path or DEFAULT_MODEL)
    return Engine(model, tokenizer, name=name, weights=dtype, cache_dir=tokenizer_dir)
