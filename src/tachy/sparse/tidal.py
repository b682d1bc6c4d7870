"""TidalDecode: position-persistent sparse attention.

Based on Yang et al. 2024, "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention" (arXiv:2410.05076). The keys a query attends to most are much the same from one layer to the next,
so a few *selection layers* run full attention, pick each row's top keys by their attention (summed over the
query heads sharing a kv head), and the sparse layers after them read only those (plus the sinks and the
recent window) until the next selection layer re-selects. The layers before the first selection layer stay
dense, as in the paper (full attention in the first two layers, selection at layer 2, re-selection at a
middle layer: 13 of Llama 3 8B's 32).

C decoder: a selection layer scores the row's keys in one extra pass over them, then attends densely; the
choice is kept per (row, kv head) for the rest of the forward. CLI: ``--attention tidal`` or
``tidal:budget=512,selection=2/12`` (selection layers separated by '/').
"""
from __future__ import annotations

from dataclasses import dataclass


from ..config import ModelConfig
from ..errors import InvalidArgumentError
from .base import DENSE, SELECT, SPARSE, SparseAttention, register


@register
@dataclass
class TidalDecodeAttention(SparseAttention):
    selection: str | int = "auto"     # selection layers, '/'-separated ("2/12"); auto: 2 and 13/32 of the depth
    name = "tidal"
    method_id = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection != "auto":
            try:
                layers = [int(x) for x in str(self.selection).split("/")]
            except ValueError:
                layers = []
            if not layers or any(x < 0 for x in layers):
                raise InvalidArgumentError(f"tidal: selection must be layer numbers separated by '/', "
                                           f"got {self.selection!r}")

    def selection_layers(self, config: ModelConfig) -> list[int]:
        """The selection layers: given ones (each must be a full-attention layer), else the first full layer
        from layer 2 and from 13/32 of the depth."""
        full = [i for i, t in enumerate(config.layer_types) if t == "full"]
        if self.selection == "auto":
            wanted = sorted({min([i for i in full if i >= want] or full[-1:]) for want in
                             (min(2, config.num_layers - 1), round(config.num_layers * 13 / 32))})
            return wanted
        layers = sorted({int(x) for x in str(self.selection).split("/")})
        bad = [x for x in layers if x not in full]
        if bad:
            raise InvalidArgumentError(f"tidal: selection layers {bad} are not full-attention layers of this model "
                                       f"(those are {full[0]}..{full[-1]}: {full[:8]}{'...' if len(full) > 8 else ''})")
        return layers

    def layer_roles(self, config: ModelConfig) -> list[int]:
        roles = super().layer_roles(config)
        chosen = self.selection_layers(config)
        return [SELECT if i in chosen else DENSE if i < chosen[0] else role for i, role in enumerate(roles)]

    def choose(self, state, layer, q, k, visible, candidate, scale):
        if state.roles[layer] == SPARSE:
            return state.chosen
        Hkv, (_, H, T, D) = k.shape[1], q.shape
        logits = q[0].float().view(Hkv, H // Hkv, T, D) @ k[0].float().transpose(-1, -2)[:, None] * scale
        mass = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1).sum(1)    # [Hkv, T, S]
        state.chosen = self.top(mass, candidate)
        return None

    def keys_read(self, role: int, context: int) -> float:
        """A selection layer reads its keys twice (choosing, then attending) and its values once."""
        return 1.5 * context if role == SELECT else super().keys_read(role, context)
