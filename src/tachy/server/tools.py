"""Function calling (OpenAI's ``tools`` / ``tool_choice``) on any chat model, with the structured-output mask.

The tools are described to the model in a system message (small models' chat templates have no tool syntax),
and the answer is constrained so that a call is always valid: ``{"name": <one of the functions>,
"arguments": <an object valid for its parameters schema>}``, compiled like any response_format (in the
constraint compiler's child process, within its budget).

* ``tool_choice: "none"``: the tools are neither shown nor callable; a plain answer.
* ``"required"``: the answer is a call to one of the functions; ``{"type": "function", "function": {"name":
  N}}``: a call to N.
* ``"auto"`` (the default when tools are given): a call, or a text answer that does not begin with ``{``.

An answer that parses as a call becomes ``message.tool_calls`` (``finish_reason: "tool_calls"``, content
null); when streaming, a call is sent as one ``delta.tool_calls`` chunk once complete.
"""
from __future__ import annotations

import json
import uuid

from .http_errors import ApiError
from .schemas import NamedToolChoice, Tool, ToolChoice


class ToolPlan:
    """What a request's tools mean for its prompt, its constraint and its answer."""

    def __init__(self, tools: list[Tool] | None, choice: ToolChoice | None):
        self.tools = {t.function.name: t.function for t in tools or []}
        if tools and len(self.tools) != len(tools):
            raise ApiError(400, "tool function names must be unique", param="tools")
        if choice is None:
            choice = "auto" if self.tools else "none"
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            if not isinstance(name, str) or name not in self.tools:   # a list or dict name is unhashable
                raise ApiError(400, f"tool_choice names function {str(name)[:64]!r}, which is not in tools",
                               param="tool_choice")
            self.callable, self.mode = [name], "required"
        else:
            if choice != "none" and not self.tools:
                raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
            self.callable, self.mode = list(self.tools) if choice != "none" else [], choice

    @property
    def active(self) -> bool:
        return bool(self.callable)

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation with the callable tools described in its system message."""
        if not self.active:
            return messages
        specs = [{"name": n, "description": self.tools[n].description or "",
                  "parameters": self.tools[n].parameters or {"type": "object"}} for n in self.callable]
        how = ("To call one, reply with only a JSON object {\"name\": <function name>, \"arguments\": "
               "{<arguments>}}" + (", or answer in plain text." if self.mode == "auto" else "."))
        text = f"You can call these functions:\n{json.dumps(specs)}\n{how}"
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}] + messages[1:]
        return [{"role": "system", "content": text}] + messages

    def response_format(self) -> dict | None:
        """The constraint of the answer (a tachy response_format), or None without callable tools."""
        if not self.active:
            return None
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]},
                                                   "arguments": self.tools[n].parameters or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for n in self.callable]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        kind = "json_schema_or_text" if self.mode == "auto" else "json_schema"
        return {"type": kind, "json_schema": {"schema": schema}}

    def parse(self, text: str) -> list[dict] | None:
        """OpenAI's ``tool_calls`` for an answer that is a call, else None (a text answer)."""
        if not self.active or not text.lstrip().startswith("{"):
            return None
        try:
            call = json.loads(text)
        except ValueError:
            return None   # cut short by max_tokens: no call was made
        if not isinstance(call, dict) or call.get("name") not in self.callable:
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]

    def maybe_call(self, text_so_far: str) -> bool:
        """Streaming: whether the answer begun so far may be a call (then it is held back until it ends)."""
        stripped = text_so_far.lstrip()
        return self.active and (not stripped or stripped.startswith("{"))
