"""MInference: dynamic sparse attention for the prefill.

Based on Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention" (arXiv:2407.02490). A long prompt's attention is sparse in a few recurring shapes, and which shape
a head shows is stable across inputs while where its mass lies is not. So each (layer, kv head) gets one
pattern offline, and the keys it reads are estimated online, per prefill chunk, before its attention runs:

* ``vs`` (vertical-slash): the chunk's last ``last_q`` rows attend to every key; their attention summed by key
  (columns: *vertical* lines) and by offset t - j (diagonals: *slash* lines) picks the top ``vertical`` columns
  (the first ``sinks`` forced) and ``slash`` diagonals (the ``window`` nearest forced). Row t reads the
  chosen columns up to t and the keys t - offset.
* ``ashape``: the first ``vertical`` keys and the last ``slash`` ones (static: the A shape).
* ``block``: 64-row query blocks against 64-key blocks, scored by mean-pooled queries and keys; each query
  block reads its top ``blocks`` key blocks (the first and its own forced).

The three read about as many keys per row (vertical + slash = 64 * blocks by default), so the offline search
compares like with like: ``pattern=auto`` (the default) runs one calibration prefill (a synthetic key-value
retrieval prompt, as the paper's search) that attends densely and measures, on sampled rows of every chunk,
the share of each head's attention each pattern keeps (its recall); the best pattern per head is kept in
tachy's cache (``TACHY_CACHE_DIR``/minference), once per model and options. ``pattern=vs`` (or ``ashape``,
``block``) uses one pattern everywhere, without calibration.

Grouped-query attention: one pattern and one key set per kv head, estimated from its query heads together
(attention summed over the group; block scores from the group's summed queries), so the C decoder's grouped
attention still loads each chosen K/V row once for the whole group.

Rows whose pattern covers all their keys (the first ``vertical + slash`` positions) read exactly their dense
key list; the last ``dense_last`` rows of the prompt (those that shape the first token) and the first
``dense_layers`` layers read densely. Decoding after the prefill reads densely, or through the decode-time
method ``decode`` (e.g. ``minference:decode=quest``). C decoder: ``sparse_keys`` filters each row's key list
(``mi_select``: work in the chosen columns, diagonals and blocks, nothing per unread key) after the chunk's
estimation (``mi_estimate``). CLI: ``--attention minference`` or ``minference:vertical=512,slash=512``.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..cache import KVCache
from ..config import ModelConfig
from ..errors import InvalidArgumentError
from ..registry import cache_root
from .base import DENSE, SparseAttention, make_attention, register

# decoder.c's PATTERN_*
PATTERNS = {"dense": 0, "vs": 1, "ashape": 2, "block": 3}
SEARCH = 4
BLOCK = 64          # keys (and query rows) per block of the block-sparse pattern
SAMPLES = 16        # rows per chunk the calibration measures recall on (decoder.c's MI_SAMPLES)
CALIBRATION_OPTIONS = ("vertical", "slash", "blocks", "last_q", "sinks", "window", "calibration_tokens")


def top_indices(score: Tensor, k: int) -> Tensor:
    """Ascending indices of the ``k`` largest of ``score`` [n] (ties to the lower index, as decoder.c)."""
    k = min(k, score.shape[-1])
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return order.sort().values


def vertical_slash_scores(q: Tensor, k: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The last query rows' attention summed by key and by offset: q [G, R, D] (the rows ending the chunk, whose
    own keys are the last R of k), k [N, D] -> (by column [N], by offset row - column [N])."""
    G, R, _ = q.shape
    N = k.shape[0]
    row = torch.arange(N - R, N, device=k.device)[:, None]                   # each last row's own key index
    col = torch.arange(N, device=k.device)[None, :]
    valid = (col <= row).expand(R, N)
    logits = (q.float() @ k.float().T) * scale                               # [G, R, N]
    p = logits.masked_fill(~valid, float("-inf")).softmax(-1).sum(0)         # [R, N]
    slash = torch.zeros(N, device=k.device).index_add_(0, (row - col).expand(R, N)[valid], p[valid])
    return p.sum(0), slash


def vertical_slash_keys(columns: Tensor, offsets: Tensor, start: int, T: int, N: int) -> Tensor:
    """[T, N] bool: row t (key index start + t) reads the chosen columns up to itself and the keys at the chosen
    offsets behind it."""
    row = torch.arange(start, start + T, device=columns.device)[:, None]
    col = torch.arange(N, device=columns.device)[None, :]
    is_col = torch.zeros(N, dtype=torch.bool, device=columns.device)
    is_col[columns] = True
    is_off = torch.zeros_like(is_col)
    is_off[offsets] = True
    causal = col <= row
    return causal & (is_col[None, :] | is_off[(row - col).clamp(min=0)])


def a_shape_keys(head: int, tail: int, start: int, T: int, N: int, device: torch.device | str = "cpu") -> Tensor:
    """[T, N] bool: each row's first ``head`` keys and its last ``tail`` ones (itself included)."""
    row = torch.arange(start, start + T, device=device)[:, None]
    col = torch.arange(N, device=device)[None, :]
    return (col <= row) & ((col < head) | (col > row - tail))


def block_choice(q: Tensor, k: Tensor, start: int, blocks: int) -> Tensor:
    """Each of the chunk's query blocks' top ``blocks`` key blocks (the first and its own forced), by the dot
    product of mean-pooled queries (summed over the group) and keys: q [G, T, D] the chunk's rows (key indices
    start ..), k [N, D] -> [query blocks, key blocks] bool."""
    G, T, D = q.shape
    N = k.shape[0]
    kb = -(-N // BLOCK)
    kmean = torch.stack([k[i * BLOCK:(i + 1) * BLOCK].float().mean(0) for i in range(kb)])
    first, last = start // BLOCK, (N - 1) // BLOCK
    chosen = torch.zeros(last - first + 1, kb, dtype=torch.bool, device=k.device)
    qs = q.float().sum(0)                                                      # [T, D]
    for qb in range(first, last + 1):
        lo, hi = max(qb * BLOCK, start), min((qb + 1) * BLOCK, N)
        score = kmean[:qb + 1] @ qs[lo - start:hi - start].mean(0)
        score[0] = score[qb] = float("inf")
        chosen[qb - first, top_indices(score, blocks)] = True
    return chosen


def block_keys(chosen: Tensor, start: int, T: int, N: int) -> Tensor:
    """[T, N] bool: each row reads the chosen key blocks of its query block, up to itself."""
    row = torch.arange(start, start + T, device=chosen.device)[:, None]
    col = torch.arange(N, device=chosen.device)[None, :]
    return (col <= row) & chosen[row // BLOCK - start // BLOCK, col // BLOCK]


@register
@dataclass
class MInferenceAttention(SparseAttention):
    """MInference (see the module docstring). Options (defaults):

    vertical (512): columns a ``vs`` head reads (the first ``sinks`` forced); the A shape's first keys.
    slash (512): diagonals a ``vs`` head reads (the ``window`` nearest forced); the A shape's last keys.
    blocks (16): 64-key blocks each 64-row query block reads under ``block``.
    last_q (64): the chunk's last rows whose attention estimates the vertical and slash lines.
    pattern ("auto"): per head from calibration, or ``vs`` / ``ashape`` / ``block`` for every head.
    dense_layers (8): the first layers read densely (docs/long_context.md: with 0, 7 of 13 needles at 4k
        against dense's 10; with 8, dense's answers). dense_last (64): the prompt's last rows read densely.
    decode ("dense"): the decode-time method after the prefill (a name: quest, tidal, or a SparseAttention).
    calibration (None): a calibration file (JSON) to read instead of tachy's cache.
    calibration_tokens (4096): the calibration prompt's length.
    sinks (16), window (64): forced columns and diagonals of ``vs``. ``budget`` is not an option here.
    """

    budget: int | None = None
    vertical: int = 512
    slash: int = 512
    blocks: int = 16
    last_q: int = 64
    pattern: str = "auto"
    dense_layers: int = 8       # measured: smollm2-135m's needles at 4k need its first 8 of 30 layers dense
    dense_last: int = 64
    decode: str | SparseAttention | None = "dense"
    calibration: str | None = None
    calibration_tokens: int = 4096
    calibrated: dict = field(default_factory=dict, init=False, repr=False)    # model key -> patterns [layers, kv heads]
    name = "minference"
    method_id = 3

    def __post_init__(self) -> None:
        if self.budget is not None:
            raise InvalidArgumentError("minference: budget is not an option; the keys a row reads are set by "
                                       "vertical and slash (vs, ashape) and blocks (block)")
        for name, low, high in (("vertical", 1, 1 << 20), ("slash", 1, 1 << 20), ("blocks", 2, 1 << 14),
                                ("last_q", 1, 1024), ("dense_layers", 0, 1 << 10), ("dense_last", 0, 1 << 20),
                                ("calibration_tokens", 256, 1 << 20), ("sinks", 0, 1 << 20), ("window", 1, 1 << 20)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidArgumentError(f"minference: {name} must be a whole number in [{low}, {high}], "
                                           f"got {value!r}")
        if self.sinks > self.vertical:
            raise InvalidArgumentError(f"minference: sinks {self.sinks} (forced columns) exceed vertical "
                                       f"{self.vertical} (columns read)")
        if self.window > self.slash:
            raise InvalidArgumentError(f"minference: window {self.window} (forced diagonals) exceeds slash "
                                       f"{self.slash} (diagonals read)")
        if self.pattern != "auto" and self.pattern not in ("vs", "ashape", "block"):
            raise InvalidArgumentError(f"minference: pattern must be auto, vs, ashape or block, got {self.pattern!r}")
        if isinstance(self.decode, str) or self.decode is None:
            self.decode = make_attention(self.decode or "dense")
        if isinstance(self.decode, MInferenceAttention):
            raise InvalidArgumentError("minference: decode must be a decode-time method (dense, quest, tidal, "
                                       "double_sparsity)")

    # -- the prefill --------------------------------------------------------------------------------------------
    @property
    def sparse_prefill(self) -> bool:
        return True

    def layer_roles(self, config: ModelConfig) -> list[int]:
        return [DENSE if i < self.dense_layers else role for i, role in enumerate(super().layer_roles(config))]

    def check_draft(self, max_draft_tokens: int) -> None:
        if self.decode is not None:
            self.decode.check_draft(max_draft_tokens)

    def prepare(self, engine) -> None:
        """Calibrate for ``engine``'s model once (``pattern=auto``): from the calibration file, tachy's cache, or
        a calibration prefill (then cached)."""
        if self.pattern == "auto" and model_key(engine) not in self.calibrated:
            self.calibrated[model_key(engine)] = calibrate(self, engine)
        if self.decode is not None:   # the decode-time method's own calibration (Double Sparsity's channels)
            self.decode.prepare(engine)

    def patterns(self, model) -> Tensor:
        """uint8 [layers, kv heads] of PATTERNS values for ``model``."""
        cfg = model.config
        roles = self.layer_roles(cfg)
        if self.pattern == "auto":
            found = [p for key, p in self.calibrated.items() if key[1] == signature(cfg)]
            if not found:
                raise InvalidArgumentError("minference: pattern=auto needs a calibration for this model first "
                                           "(MInferenceAttention.prepare(engine); the engine calls it)")
            chosen = found[0].clone()
        else:
            chosen = torch.full((cfg.num_layers, cfg.num_kv_heads), PATTERNS[self.pattern], dtype=torch.uint8)
        chosen[torch.tensor(roles) == DENSE] = PATTERNS["dense"]
        return chosen

    def attach_prefill(self, model, cache: KVCache, prompt_tokens: int) -> None:
        cache.sparse = PrefillState(self, self.layer_roles(model.config), self.patterns(model),
                                    prompt_tokens - self.dense_last)

    def attach(self, model, cache: KVCache) -> None:
        """After the prefill: decoding reads densely, or through ``decode``."""
        cache.sparse = None
        if self.decode is not None:
            self.decode.attach(model, cache)

    # -- the PyTorch implementation (other devices; the tests' oracle) -------------------------------------------
    def mask(self, state: "PrefillState", layer: int, q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
        """Plain chunk rows: row t sees keys 0 .. start + t. q [1, H, T, D], k [1, Hkv, S, D], mask [T, S]."""
        Hkv, (_, H, T, D) = k.shape[1], q.shape
        visible = (mask if mask.dim() == 3 else mask.expand(Hkv, -1, -1)).clone()
        if state.roles[layer] == DENSE:
            return visible
        start = int(visible[0, 0].sum()) - 1
        N = start + T
        qg = q[0].view(Hkv, H // Hkv, T, D)
        for g in range(Hkv):
            pattern = int(state.patterns[layer, g])
            if pattern in (PATTERNS["dense"], SEARCH):
                if pattern == SEARCH and state.recall is not None:
                    self.measure_recall(state.recall[layer, g], qg[g], k[0, g, :N], start, scale)
                continue
            keys = self.keys(pattern, qg[g], k[0, g, :N], start, scale)
            dense_rows = torch.arange(start, N, device=k.device) >= state.dense_from
            keys[dense_rows] = True
            visible[g, :, :N] &= keys
        return visible

    def keys(self, pattern: int, q: Tensor, k: Tensor, start: int, scale: float) -> Tensor:
        """[T, N] bool: the keys each chunk row reads under ``pattern``; q [G, T, D], k [N, D]."""
        T, N = q.shape[1], k.shape[0]
        if pattern == PATTERNS["ashape"]:
            return a_shape_keys(self.vertical, self.slash, start, T, N, k.device)
        if pattern == PATTERNS["block"]:
            return block_keys(block_choice(q, k, start, self.blocks), start, T, N)
        columns, offsets = vertical_slash_scores(q[:, -min(self.last_q, T):], k, scale)
        columns[:self.sinks] = float("inf")
        offsets[:self.window] = float("inf")
        return vertical_slash_keys(top_indices(columns, self.vertical), top_indices(offsets, self.slash),
                                   start, T, N)

    def measure_recall(self, out: Tensor, q: Tensor, k: Tensor, start: int, scale: float) -> None:
        """Calibration on the PyTorch path (decoder.c's search mode): add each pattern's kept attention share on
        the chunk's sampled rows to out [4] (vs, ashape, block, rows counted)."""
        T, N = q.shape[1], k.shape[0]
        R = min(self.last_q, T)
        rows = [(s + 1) * (T - R) // (SAMPLES + 1) for s in range(SAMPLES)] if T > R else []
        rows = [t for t in rows if start + t + 1 > self.vertical + self.slash]
        if not rows:
            return
        col = torch.arange(N, device=k.device)
        p = ((q[:, rows].float() @ k.float().T) * scale).masked_fill(
            col[None, None] > torch.tensor(rows, device=k.device)[None, :, None] + start,
            float("-inf")).softmax(-1)                                                                  # [G, r, N]
        for i, pattern in enumerate(("vs", "ashape", "block")):
            keep = self.keys(PATTERNS[pattern], q, k, start, scale)[rows]
            out[i] += float((p * keep).sum())
        out[3] += p.shape[0] * len(rows)

    # -- cost ----------------------------------------------------------------------------------------------------
    def keys_read(self, role: int, context: int) -> float:
        return float(context) if self.decode is None else self.decode.keys_read(role, context)

    def kv_bytes_per_token(self, config: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
        if self.decode is not None:
            return self.decode.kv_bytes_per_token(config, context, dtype_bytes)
        return super().kv_bytes_per_token(config, context, dtype_bytes)


class PrefillState:
    """``cache.sparse`` during a MInference prefill: the method, layer roles, each (layer, kv head)'s pattern,
    the first position that reads densely, and (calibration) the recall sums, (tests) the record of keys read."""

    def __init__(self, method: MInferenceAttention, roles: list[int], patterns: Tensor, dense_from: int,
                 recall: Tensor | None = None, record: Tensor | None = None):
        self.method, self.roles, self.patterns, self.dense_from = method, roles, patterns.contiguous(), dense_from
        self.roles_u8 = torch.tensor(roles, dtype=torch.uint8)
        self.recall, self.record = recall, record

    def truncate(self, length: int) -> None:
        pass

    def c_fields(self, cache: KVCache) -> dict:
        m = self.method
        return dict(patterns=self.patterns.data_ptr(), vertical=m.vertical, slash=m.slash, blocks=m.blocks,
                    last_q=m.last_q, dense_from=self.dense_from,
                    recall=None if self.recall is None else self.recall.data_ptr(),
                    record=None if self.record is None else self.record.data_ptr())


# -- calibration ---------------------------------------------------------------------------------------------------
def signature(cfg: ModelConfig) -> str:
    """What a calibration must match: the model's shape."""
    return (f"{cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}, "
            f"vocab {cfg.vocab_size}")


def model_key(engine) -> tuple[str, str]:
    return engine.name, signature(engine.model.config)


def calibration_prompt(engine, tokens: int) -> list[int]:
    """A synthetic key-value retrieval prompt of ``tokens`` tokens (the paper searches on one such sample):
    random hex keys and values as JSON, then a question about a key in the middle."""
    rng = random.Random(0)
    pairs = [(f"{rng.getrandbits(64):016x}", f"{rng.getrandbits(64):016x}") for _ in range(tokens // 8)]
    key = pairs[len(pairs) // 2][0]
    body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
    question = f'}}\nWhat is the value of the key "{key}" in the JSON above? The value is "'
    ids = engine.tokenizer.encode("Extract the value of the key asked for from this JSON object.\n{" + body,
                                  add_special_tokens=False)
    tail = engine.tokenizer.encode(question, add_special_tokens=False)
    return ids[:tokens - len(tail)] + tail


def calibration_path(method: MInferenceAttention, engine) -> Path:
    if method.calibration is not None:
        return Path(method.calibration)
    opts = {k: getattr(method, k) for k in CALIBRATION_OPTIONS}
    digest = hashlib.sha256(json.dumps([signature(engine.model.config), opts], sort_keys=True).encode()).hexdigest()
    return cache_root() / "minference" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', engine.name)}-{digest[:12]}.json"


def calibrate(method: MInferenceAttention, engine, progress: bool = True) -> Tensor:
    """Each (layer, kv head)'s pattern for ``engine``'s model: read from the calibration file if there is one
    (an error if it was made for another model), else measured by one calibration prefill and written there."""
    path = calibration_path(method, engine)
    sig = signature(engine.model.config)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            model, saved_sig, patterns = saved["model"], saved["signature"], saved["patterns"]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidArgumentError(f"minference: {path} is not a calibration file ({e})") from None
        if saved_sig != sig:
            raise InvalidArgumentError(f"minference: calibration {path} was made for {model} ({saved_sig}), not for "
                                       f"{engine.name} ({sig}); calibrate this model without calibration=, or give "
                                       f"its own file")
        return torch.tensor(patterns, dtype=torch.uint8)
    if method.calibration is not None:
        raise InvalidArgumentError(f"minference: calibration file {path} does not exist")
    recall = measure_patterns(method, engine, progress)
    share = recall[..., :3] / recall[..., 3:].clamp(min=1)
    patterns = (share.argmax(-1) + 1).to(torch.uint8)             # ties: the first, vs
    names = {v: k for k, v in PATTERNS.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(method)}.tmp")
    tmp.write_text(json.dumps({
        "model": engine.name, "signature": sig, "method": "minference",
        "options": {k: getattr(method, k) for k in CALIBRATION_OPTIONS},
        "patterns": patterns.tolist(),
        "names": [[names[int(p)] for p in row] for row in patterns],
        "recall": [[[round(float(x), 4) for x in head] for head in layer] for layer in share]}, indent=1))
    tmp.replace(path)
    return patterns


@torch.inference_mode()
def measure_patterns(method: MInferenceAttention, engine, progress: bool = True) -> Tensor:
    """The calibration prefill: dense attention (search mode) over the calibration prompt, chunk by chunk as the
    engine prefills, summing each pattern's recall per (layer, kv head): float64 [layers, kv heads, 4]."""
    from tqdm import tqdm

    from ..generation import PREFILL_CHUNK

    model, cfg = engine.model, engine.model.config
    ids = calibration_prompt(engine, min(method.calibration_tokens, engine.max_context - 1))
    cache = model.new_cache(capacity=len(ids), fixed=True)
    recall = torch.zeros(cfg.num_layers, cfg.num_kv_heads, 4, dtype=torch.float64)
    patterns = torch.full((cfg.num_layers, cfg.num_kv_heads), SEARCH, dtype=torch.uint8)
    cache.sparse = PrefillState(method, method.layer_roles(cfg), patterns, len(ids) + 1, recall=recall)
    chunks = range(0, len(ids), PREFILL_CHUNK)
    with cache.plain_rows():
        for s in tqdm(chunks, desc=f"minference: calibrating {engine.name}", unit="chunk", file=sys.stderr,
                      disable=not progress, leave=False):
            chunk = ids[s:s + PREFILL_CHUNK]
            model(torch.tensor([chunk], device=engine.device), torch.arange(s, s + len(chunk), device=engine.device),
                  cache, last_only=True)
    return recall
