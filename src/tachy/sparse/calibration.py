"""Offline channel calibration for sparse attention: how much each key channel contributes to q.k, per layer
and kv head, measured once per model over a calibration text and cached beside the converted weights.

``channel_importance`` runs the PyTorch forward (a query observer, as the KV presses use) over the text's
first tokens and returns ``importance[layer, kv_head, d] = mean_t sum_h |q_{h,t,d}| * mean_s |k_{s,d}|``, the
mean of |q_d k_d| over every (query, key) pair of the text, summed over the query heads sharing the kv head
(|q_d k_d| factors, so the mean over pairs is the product of the means). Queries and keys are taken after
rope, as attention sees them.

``load_or_calibrate`` keeps the result in ``<cache root>/calibration/`` (``TACHY_CACHE_DIR``), keyed by the
model's fingerprint (its config and the leading bytes of every weight) and the calibration text and length;
a file made for another model, or for another shape, is a clear error.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, TachyError
from ..registry import cache_root

CALIBRATION_FORMAT = 1
DEFAULT_TEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "frankenstein_pg84.txt"
CHUNK = 512   # tokens per calibration forward (bounds the attention scores' memory; the progress bar's step)


def model_fingerprint(model) -> str:
    """A short hash naming this model's weights: its config and the first 4 KiB of every tensor of its
    state dict (quantized blocks included), enough to tell models and fine-tunes apart without reading GBs."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        t = t.detach().reshape(-1)[:4096].cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes()[:4096])
    return h.hexdigest()


@torch.inference_mode()
def channel_importance(model, ids: list[int], progress: bool = True) -> Tensor:
    """float32 [layers, kv_heads, head_dim]: mean |q_d k_d| over the (query, key) pairs of ``ids`` (queries
    summed over each kv head's group), after rope. Runs the PyTorch forward in chunks of CHUNK tokens."""
    from tqdm import tqdm

    cfg = model.config
    L, Hkv, D, G = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    if len(ids) < 16:
        raise InvalidArgumentError(f"calibration needs at least 16 tokens of text, got {len(ids)}")
    q_abs = torch.zeros(L, Hkv, D, dtype=torch.float64)
    cache = model.new_cache(capacity=len(ids))

    def observe(layer: int, q: Tensor) -> None:     # q [1, H, T, D] (rope applied, times the scale)
        q_abs[layer] += q[0].abs().double().view(Hkv, G, -1, D).sum((1, 2))

    cache.observer = observe                           # also keeps the forward off the C decoder (no observer)
    bar = tqdm(total=len(ids), desc="calibrating double_sparsity", unit="tok", file=sys.stderr, disable=not progress)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        model(torch.tensor([chunk], device=model.device), torch.arange(start, start + len(chunk), device=model.device),
              cache)
        bar.update(len(chunk))
    bar.close()
    k_abs = cache.k[:, 0, :, :len(ids)].abs().double().mean(2)          # [L, Hkv, D]
    return (q_abs / len(ids) / cfg.attn_scale * k_abs).float()


def calibration_path(model, text: Path, tokens: int) -> Path:
    """Where the calibration of ``model`` on ``tokens`` tokens of ``text`` is cached."""
    digest = hashlib.blake2b(f"{text.name}:{text.stat().st_size}:{tokens}".encode(), digest_size=6).hexdigest()
    return cache_root() / "calibration" / f"channels-{model_fingerprint(model)}-{digest}.pt"


def check_calibration(data: dict, model, source: Path | str) -> Tensor:
    """The importance tensor of a loaded calibration, after checking it was made for ``model``."""
    cfg = model.config
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or "importance" not in data:
        raise InvalidArgumentError(f"{source} is not a tachy channel calibration (format {CALIBRATION_FORMAT})")
    want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if tuple(data["importance"].shape) != want:
        raise InvalidArgumentError(
            f"calibration {source} is for a model with (layers, kv heads, head_dim) = "
            f"{tuple(data['importance'].shape)}, this model has {want}")
    if data.get("model") != model_fingerprint(model):
        raise InvalidArgumentError(
            f"calibration {source} was made for another model (fingerprint {data.get('model')}, this model's is "
            f"{model_fingerprint(model)}); calibrate this model (leave calibration= unset) or pass its own file")
    return data["importance"]


def load_or_calibrate(model, tokenizer, text: Path | None = None, tokens: int = 4096, path: Path | None = None,
                      progress: bool = True) -> Tensor:
    """The channel importance of ``model``: read from ``path`` (default: the cache) if there, else calibrated on
    the first ``tokens`` tokens (at most the model's window) of ``text`` (default DEFAULT_TEXT) and written
    there (atomically)."""
    text = Path(text) if text else DEFAULT_TEXT
    tokens = min(tokens, model.config.max_seq_len)     # the calibration is one sequence within the window
    explicit = path is not None
    if path is None:
        if not text.is_file():
            raise TachyError(f"calibration text {text} not found; pass calibration_text=FILE (plain text)")
        path = calibration_path(model, text, tokens)
    path = Path(path)
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # noqa: BLE001 - any unreadable file is the same user error
            raise InvalidArgumentError(f"calibration {path} is unreadable: {e}") from None
        return check_calibration(data, model, path)
    if explicit and not text.is_file():
        raise TachyError(f"calibration text {text} not found; pass calibration_text=FILE (plain text)")
    ids = tokenizer.encode(text.read_text(encoding="utf-8", errors="replace")[: tokens * 12],
                           add_special_tokens=False)[:tokens]
    importance = channel_importance(model, ids, progress)
    data = {"format": CALIBRATION_FORMAT, "model": model_fingerprint(model), "text": text.name, "tokens": len(ids),
            "importance": importance}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(data)}")
        torch.save(data, tmp)
        tmp.replace(path)
    except OSError as e:   # an unwritable cache costs the next run a calibration, not this one
        print(f"could not cache the calibration in {path}: {e}", file=sys.stderr)
    return importance
