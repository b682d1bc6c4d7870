"""Tiny engines for decoding tests: a random tiny model plus a stand-in tokenizer (ids only, one EOS)."""
from __future__ import annotations

from tachy.engine import Engine
from tests.conftest import hf_twin, tiny_config


class IdsTokenizer:
    """Just enough tokenizer for the search strategies: EOS ids and an id-level encode/decode."""

    def __init__(self, eos: list[int]):
        self.eos_token_ids = list(eos)

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]


def tiny_engine(seed: int = 0, eos: tuple[int, ...] = (3,), arch: str = "llama", **overrides):
    """(engine, hf twin): the same random weights in tachy and transformers, fp32."""
    from tachy.models import build_model

    cfg = tiny_config(arch, **overrides)
    hf, sd = hf_twin(cfg, seed)
    model = build_model(cfg)
    model.load_hf_state_dict(sd)
    return Engine(model.eval(), IdsTokenizer(list(eos)), name="tiny"), hf


def smollm_tokenizer():
    """The embedded model's real tokenizer (49152 tokens, byte-level BPE), without loading the model."""
    from tachy.models.load import load_checkpoint
    from tachy.registry import resolve_model
    from tachy.tokenizer import Tokenizer

    _, _, tok_dir = load_checkpoint(resolve_model("smollm2-135m"), progress=False)
    return Tokenizer.from_path(tok_dir)


def tiny_engine_with_tokenizer(tokenizer, seed: int = 0):
    """A tiny random model over a real tokenizer's vocabulary: near-uniform, so constraints get stressed."""
    engine, _ = tiny_engine(seed=seed, vocab_size=tokenizer.vocab_size, max_seq_len=512)
    engine.tokenizer = tokenizer
    return engine
