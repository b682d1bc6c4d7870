"""What needle.py and ppl.py share: the press and attention sweep, one prefill per prompt, compressed copies,
greedy decode.

The expensive part of a long-context eval is the prefill, so each prompt is prefilled once (recording every
layer's queries when a press scores with them), and each press/ratio compresses a *copy* of that cache with
those queries. Scores that do not depend on the ratio (SnapKV's votes, H2O's accumulated attention) are
computed once per prompt (memo). A sparse attention setting (tachy.sparse) attaches its method to a copy:
the prompt is prefilled densely, as the engine does, and the answer is decoded sparsely.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import KVCache, key_bucket
from ..engine import Engine
from ..errors import InvalidArgumentError, TachyError
from ..presses import Press, available_presses, make_press
from ..sparse import make_attention

DEFAULT_HAYSTACK = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass
class Setting:
    """One press at one ratio ("full" is the uncompressed baseline), read with one attention ("dense" or a
    tachy.sparse method)."""

    press: str
    ratio: float
    attention: str = "dense"

    @property
    def label(self) -> str:
        press = "full" if self.press == "full" else f"{self.press}@{self.ratio:g}"
        if self.attention == "dense":
            return press
        return self.attention if self.press == "full" else f"{press}+{self.attention}"

    def make(self) -> Press | None:
        return None if self.press == "full" else make_press(self.press, self.ratio)


def parse_list(text: str, kind=str, what: str = "value") -> list:
    try:
        items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise InvalidArgumentError(f"bad {what} list {text!r}: {e}") from None
    if not items:
        raise InvalidArgumentError(f"empty {what} list")
    return items


def settings(presses: str | None, ratios: str, attentions: str | None = None) -> list[Setting]:
    """The baseline plus every press at every ratio, then every sparse attention (over the full cache); each is
    validated before any model loads. No presses: only the attentions (and the baseline)."""
    out = [Setting("full", 0.0)]
    for name in parse_list(attentions, what="attention") if attentions else []:
        make_attention(name)   # unknown name / bad options fail here
        out.append(Setting("full", 0.0, name))
    if not presses:
        return out
    return out[:1] + press_settings(presses, ratios) + out[1:]


def press_settings(presses: str, ratios: str) -> list[Setting]:
    """Every press at every ratio."""
    names = parse_list(presses, what="press")
    if "all" in names:
        names = available_presses()
    out = []
    for name in names:
        if not make_press(name, 0.0).evicts:   # quantization alone: its size is set by bits, not a ratio
            out.append(Setting(name, 0.0))
            continue
        for ratio in parse_list(ratios, float, "ratio"):
            make_press(name, ratio)   # unknown name / ratio outside [0, 1) fail here
            out.append(Setting(name, ratio))
    return out


def read_text(path: str | Path | None, flag: str) -> str:
    path = Path(path) if path else DEFAULT_HAYSTACK
    if not path.is_file():
        raise TachyError(f"{path} not found; pass {flag} FILE (a plain-text file)")
    return path.read_text(encoding="utf-8", errors="replace")


class Prefilled:
    """A prompt prefilled once: the cache and, when a press needs them (``record``), the queries every layer
    saw. Without recording the prefill takes the C forward where it runs (the queries need the PyTorch one)."""

    def __init__(self, engine: Engine, ids: list[int], extra: int, record: bool = True):
        self.engine, self.ids = engine, ids
        model = engine.model
        self.cache = model.new_cache(capacity=key_bucket(len(ids) + extra), fixed=True)
        self.recorder = make_press("h2o")          # records every query of every layer
        self.memo: dict = {}
        start = time.perf_counter()
        with self.recorder.observing(self.cache) if record else nullcontext():
            engine._prefill(ids, self.cache)
        self.seconds = time.perf_counter() - start

    def compressed(self, setting: Setting) -> KVCache:
        """A copy of the prefilled cache compressed by ``setting``, its sparse attention attached."""
        cache = self.cache.clone()
        press = setting.make()
        if press is not None and press.active:
            press.prepare(self.engine.model)
            press.adopt_queries(self.recorder.collected)
            press.apply(cache, self.memo)
        attention = make_attention(setting.attention)
        if attention is not None:
            attention.attach(self.engine.model, cache)
        return cache


def records(settings: list[Setting]) -> bool:
    """Whether the prefill records queries: whenever presses are compared (as before sparse attention came:
    the same prefill, on the PyTorch forward), not for sparse attention alone."""
    return any(s.press != "full" for s in settings)


def greedy(engine: Engine, cache: KVCache, token: int, n: int) -> list[int]:
    """Forward ``token`` at the cache's next position, then decode greedily; return the ``n`` new tokens."""
    out: list[int] = []
    eos = set(engine.tokenizer.eos_token_ids)
    for _ in range(n):
        logits = engine.model(torch.tensor([[token]], device=engine.device),
                              torch.tensor([cache.position], device=engine.device), cache)
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
    return out
