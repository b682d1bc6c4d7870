"""Request bodies of the OpenAI endpoints, with OpenAI's field names, and the OpenAI error body.

Only what tachy acts on is declared; other OpenAI fields (``user``, ``metadata``, ``store`` ...) are accepted
and ignored, as vLLM does, so that existing clients keep working. Ranges follow OpenAI's API reference.
"""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    # strict: a value of the wrong JSON type is a 400, as in OpenAI's API, not converted ("1" read as the
    # seed 1, ``[true, false]`` as the token ids [1, 0]); integers still fill float fields
    model_config = ConfigDict(extra="ignore", strict=True)


class TachyOptions(_Body):
    """The tachy extension: ``"tachy": {"drafter": "default", "max_draft_tokens": 16, "strategy": "beam",
    "strategy_options": {"num_beams": 4}, "watermark": true, "press": "snapkv", "compression_ratio": 0.5,
    "attention": "quest"}``."""

    model_config = ConfigDict(extra="forbid")
    drafter: str = "default"          # a name from `tachy drafters`, "none" for plain decoding
    max_draft_tokens: int = Field(16, ge=0, le=64)
    strategy: str = "default"         # a decoding strategy (tachy.decoding): beam, contrastive_search, ...
    strategy_options: dict = Field(default_factory=dict)
    watermark: Union[bool, dict, None] = None
    press: str | None = None          # KV-cache compression (tachy.presses), e.g. "snapkv" or "snapkv+kivi4"
    compression_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    prefix_cache: bool = True         # reuse the K/V of earlier requests' prefixes (tachy.prefix_cache)
    # chat only: retrieved passages placed before the last user message, encoded one by one (APE,
    # tachy.context.ape) and cached across requests; each string as given (include your own separators)
    passages: list[str] | None = Field(None, min_length=1, max_length=64)
    ape_temperature: float = Field(0.9, gt=0.0, le=1.0)
    ape_scale: float = Field(0.9, gt=0.0, le=1.0)
    attention: str | None = None      # sparse attention (tachy.sparse), e.g. "quest", "tidal", "minference"


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Prediction(_Body):
    """Predicted Outputs: the text the answer is expected to repeat (for example the file being edited)."""

    type: Literal["content"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Body):
    """Structured output: ``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}``; tachy also takes ``{"type": "regex", "regex": "..."}``."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema", "regex"]

    def as_config(self) -> dict | None:
        """The ``GenerationConfig.response_format`` value (None for plain text)."""
        return None if self.type == "text" else self.model_dump()


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None


class Tool(_Body):
    """Function calling (server/tools.py): ``{"type": "function", "function": {"name", "description",
    "parameters"}}``."""

    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ChatMessage(_Body):
    # OpenAI's roles; another one (a typo) was rendered into the prompt as it came, silently
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[dict] | None = None     # an assistant turn that called tools (server/tools.py)
    tool_call_id: str | None = None          # a tool's answer

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """Name the part a text model cannot read (an image, audio, a file), instead of pydantic's three
        failed alternatives."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"only text content parts are supported; got a {kind[:40]!r} part "
                                     "(tachy's models read text only)")
        return content

    @model_validator(mode="after")
    def _content_where_required(self) -> "ChatMessage":
        """As in OpenAI's API, only an assistant turn holding ``tool_calls`` (and the deprecated function
        role) may leave ``content`` out or null: a user message without content was read as an empty one."""
        if self.content is None and self.role != "function" and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content" +
                             (" (or tool_calls)" if self.role == "assistant" else ""))
        return self

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        if not text and self.tool_calls:   # shown to the model as the calls it wrote
            text = "\n".join(_call_text(c) for c in self.tool_calls)
        # "developer" is OpenAI's newer name for the system turn, which chat templates know as "system"
        return {"role": "system" if self.role == "developer" else self.role, "content": text or ""}


def _call_text(call: dict) -> str:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except (ValueError, RecursionError):   # not JSON, or nested too deep to parse: shown as the string it is
        pass
    return json.dumps({"name": function.get("name"), "arguments": arguments})


MAX_STOP = 64   # OpenAI takes 4; every stop string is searched for at each step of the one worker thread
MAX_STOP_CHARS = 1000   # a stop string holds back that much streamed text (it could still be completing)


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = Field(None)   # at most MAX_STOP strings (checked by the app)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)   # token id (a string) -> bias
    # the sampling controls vLLM's and llama.cpp's servers take beside OpenAI's (SamplingConfig's meanings)
    top_k: int | None = Field(None, ge=-1)              # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    ignore_eos: bool = False   # vLLM's: go on past the end-of-text token, up to max_tokens (benchmarks)
    seed: int | None = None
    prediction: Prediction | None = None
    response_format: ResponseFormat | None = None
    tachy: TachyOptions = Field(default_factory=TachyOptions)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    functions: list | None = None           # OpenAI's deprecated form of tools: a 400 that says so
    function_call: Union[str, dict, None] = None
    # outputs tachy cannot give (audio, web search): declared so that asking for them is a 400, not text
    modalities: list[str] | None = None
    audio: dict | None = None
    web_search_options: dict | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]   # text(s), token ids, lists of token ids
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None   # not supported beyond n: declared so that using it is a 400


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``. Messages and params may quote
    the client's text, lone surrogates included, which no JSON encoder can write: those are escaped."""
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")
