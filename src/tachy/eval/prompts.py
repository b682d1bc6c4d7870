"""Long-context prompts in token ids, shared by the needle test and the RULER-style tasks.

A prompt is ``head + body + tail``: the frame (chat template or plain completion) around a body that is a
haystack with sentences spliced in at chosen depths. Everything is counted in the model's tokens, so a prompt
has exactly the length asked for, whatever the tokenizer does with the text.

Frame: an instruct model (with a chat template) gets intro, body and question as the user turn and the answer
primed as the start of the assistant's turn; a base model gets the same as plain text ending in
"Answer: <prefix>".
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import Engine
from ..errors import InvalidArgumentError


@dataclass
class Frame:
    """Token ids before and after the body of one prompt."""

    head: list[int]
    tail: list[int]

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)


def frame(engine: Engine, question: str, answer: str, intro: str = "") -> Frame:
    """The frame around a body: ``intro`` before it, ``question`` after it, the answer primed with ``answer``."""
    tok = engine.tokenizer
    if tok.has_chat_template:
        marker = "@@BODY@@"
        text = tok.apply_chat_template([{"role": "user", "content": intro + marker}], add_generation_prompt=True)
        before, after = text.split(marker)
        return Frame(tok.encode(before, add_special_tokens=False),
                     tok.encode("\n\n" + question + after + answer, add_special_tokens=False))
    head = tok.encode("", add_special_tokens=True)   # BOS where the model uses one
    if intro:
        head += tok.encode(intro, add_special_tokens=False)
    return Frame(head, tok.encode(f"\n\nQuestion: {question}\nAnswer: {answer}", add_special_tokens=False))


class Haystack:
    """Token ids of a plain text that bodies are cut from, and where its lines break (where sentences go)."""

    def __init__(self, engine: Engine, text: str, max_tokens: int):
        tok = engine.tokenizer
        self.engine = engine
        self.filler = tok.encode(text[: max_tokens * 8], add_special_tokens=False)
        if len(self.filler) < max_tokens:
            raise InvalidArgumentError(f"the haystack text has only {len(self.filler)} tokens; {max_tokens} needed")
        newline = [i for i, t in enumerate(self.filler[:max_tokens]) if "\n" in tok.decode([t])]
        self.breaks = newline or list(range(max_tokens))

    def sentence(self, text: str) -> list[int]:
        """A sentence as its own line, ready to splice in after a line break."""
        return self.engine.tokenizer.encode(text + "\n", add_special_tokens=False)

    def body(self, length: int, inserts: list[tuple[float, list[int]]]) -> list[int]:
        """``length`` tokens: the start of the haystack with each (depth, ids) insert at the line break nearest
        ``depth`` (0..1) of it, in depth order."""
        room = length - sum(len(ids) for _, ids in inserts)
        if room < 0:
            raise InvalidArgumentError(f"{length} tokens cannot hold sentences of {length - room} tokens")
        filler = self.filler[:room]
        out, last = [], 0
        for depth, ids in sorted(inserts, key=lambda x: x[0]):
            at = min((b + 1 for b in self.breaks if b < room), key=lambda b: abs(b - depth * room), default=0)
            at = max(at, last)   # two inserts that want the same break keep their order
            out += filler[last:at] + ids
            last = at
        return out + filler[last:]
