"""Prompt files in the MT-Bench / Spec-Bench JSONL layout, and an even spread over categories."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TachyError
from ..tokenizer import is_unicode


@dataclass
class Prompt:
    id: str
    category: str
    turns: list[str]


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read one question per line: ``id`` (or ``question_id``), ``category``, ``turns`` (list of strings).

    Errors name the file and line, since benchmark files are often assembled by hand.
    """
    path = Path(path)
    if not path.is_file():
        raise TachyError(f"prompts file {path} does not exist")
    prompts = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TachyError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TachyError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TachyError(f"{where}: expected a JSON object, got {type(row).__name__}")
            pid = row.get("id", row.get("question_id"))
            turns = row.get("turns")
            if pid is None:
                raise TachyError(f"{where}: missing 'id' (or 'question_id')")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise TachyError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
            if any(not is_unicode(t) for t in turns):
                raise TachyError(f"{where}: a turn holds a lone surrogate (an escape such as \\ud800), "
                                 f"which is not text")
            prompts.append(Prompt(str(pid), str(row.get("category", "uncategorized")), turns))
    if not prompts:
        raise TachyError(f"prompts file {path} has no prompts")
    return prompts


def spread(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """At most ``limit`` prompts taken round-robin over the categories (in file order within each)."""
    if limit is None or limit >= len(prompts):
        return prompts
    if limit < 1:
        raise TachyError(f"--limit must be at least 1, got {limit}")
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = list(by_category.values())
    chosen: list[Prompt] = []
    i = 0
    while len(chosen) < limit:
        queue = queues[i % len(queues)]
        taken = sum(1 for p in chosen if p.category == queue[0].category)
        if taken < len(queue):
            chosen.append(queue[taken])
        i += 1
    return chosen
