"""Several presses applied in order, e.g. eviction then quantization: ``make_press("snapkv+kivi4", 0.75)``
evicts 75% of the prompt's KV with SnapKV, then stores what is left in 4 bits (13-14x fewer bytes than the
full bf16 cache, measured in docs/presses.md). The ratio goes to the evicting parts; they share the queries
collected during prefill."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from .base import Press


@dataclass
class ComposedPress(Press):
    parts: list[Press] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        for part in self.parts:
            if part.evict_every:   # its decoding-time eviction would be lost (and a quantized prefix refuses it)
                raise InvalidArgumentError(f"{part.name} evicts while decoding and cannot be composed")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(p.name for p in self.parts)

    @property
    def query_window(self) -> int:  # type: ignore[override]
        windows = [p.query_window for p in self.parts]
        return -1 if -1 in windows else max(windows, default=0)

    @property
    def evicts(self) -> bool:  # type: ignore[override]
        return any(p.evicts for p in self.parts)

    @property
    def active(self) -> bool:
        return any(p.active for p in self.parts)

    def prepare(self, model) -> None:
        for part in self.parts:
            part.prepare(model)

    def apply(self, cache, memo=None) -> None:
        for part in self.parts:
            if part.active:
                part.adopt_queries(self.collected)
                part.apply(cache, memo)
        self._queries = {}
