"""Tokenizer: a thin layer over a fast ``tokenizers.Tokenizer`` that behaves like transformers' tokenizers.

We keep transformers out of the hot path (encode/decode/streaming) but reproduce its observable behaviour:
the same BOS handling, the same chat template rendering. For GGUF files, transformers' own converter builds
the tokenizer from the file's metadata (once; load.py caches the result as ordinary tokenizer files).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from .errors import InvalidArgumentError, ModelLoadError, TachyError

# Tokens that end an assistant turn in common chat formats; a generation stops on them as on EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")
LONG_TEXT = 16_384   # characters: Tokenizer.encode tokenizes longer texts without holding the GIL
CONTENT_MARK = "\ue000{}\ue001"   # private-use characters around a message index (Tokenizer.chat_ids)


def _token_str(value: Any) -> str | None:
    """Special tokens appear as plain strings or as serialized AddedToken dicts in tokenizer_config.json."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode/chat template for one model; see docs/architecture.md for the contract."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any] | None = None, name: str = "model",
                 extra_eos_token_ids: Sequence[int] = ()) -> None:
        self._tok = backend
        self.config = dict(config or {})
        self.name = name
        self.chat_template: str | None = self.config.get("chat_template") or None
        if isinstance(self.chat_template, list):   # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.add_eos_token = bool(self.config.get("add_eos_token", False)) and self.token_to_id(self.eos_token) is not None
        # Like transformers: explicit add_bos/add_eos flags (or no post-processor at all) define how special
        # tokens are added; otherwise tokenizer.json's own post-processor (e.g. Llama 3's BOS) is the truth.
        if "add_bos_token" in self.config or "add_eos_token" in self.config or backend.post_processor is None:
            self._set_post_processor()
        eos: list[int] = []
        for tid in [self.token_to_id(self.eos_token), *extra_eos_token_ids,
                    *(self.token_to_id(t) for t in END_OF_TURN_TOKENS)]:
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: list[int] = eos

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """A folder with tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json (tachy needs a fast tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{tok_file}: cannot read tokenizer: {e}") from e
        config = _read_json(folder / "tokenizer_config.json") or {}
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():   # transformers v5 saves the template here; it wins over tokenizer_config.json
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        gen = _read_json(folder / "generation_config.json") or {}
        extra = gen.get("eos_token_id")
        extra_ids = [] if extra is None else (list(extra) if isinstance(extra, list) else [extra])
        name = Path(config.get("tachy_source") or folder).name
        return cls(backend, config, name=name, extra_eos_token_ids=extra_ids)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's metadata (no caching; load_checkpoint caches it)."""
        backend, config = gguf_tokenizer(path)
        return cls(backend, config, name=Path(path).name)

    @classmethod
    def from_path(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer folder or a .gguf file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_folder(p)
        if p.is_file():
            return cls.from_gguf(p)
        raise ModelLoadError(f"{p}: no such tokenizer folder or GGUF file")

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by from_folder and transformers)."""
        save_tokenizer_files(self._tok, self.config, Path(folder))

    # ---- basic API ----------------------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens the model's BOS is prepended when it wants one (Gemma yes, SmolLM no).
        A long text goes through ``encode_batch`` (the same ids), which releases the GIL: ``encode`` holds it,
        0.4 s per MB of text, so a server thread tokenizing a large request stopped the event loop and the
        generating thread for as long."""
        return _encode(self._tok, text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages with the model's Jinja chat template, as transformers does; extra kwargs reach the template."""
        if not self.chat_template:
            raise TachyError(f"model {self.name!r} has no chat template (a base model?); "
                             f"use plain text generation instead of chat")
        messages = plain_messages(messages)
        import jinja2
        special = {k: _token_str(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            template = _compiled_template(self.chat_template)
            variables = {**{k: v for k, v in special.items() if v is not None}, **kwargs}
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise InvalidArgumentError(f"chat template of {self.name!r} rejected the messages: {e}") from e

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of ``text`` with the text of special tokens read as plain text (user-supplied documents
        and message contents: chat_ids), without BOS."""
        return _encode(self._literal, text, False)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the chat template. Text inside a message that spells a
        special token (``<|im_end|>\\n<|im_start|>system``) stays text, as in OpenAI's API: otherwise a user
        could close their turn and open one of another role. Such messages are rendered as marks, and their
        content is encoded with special tokens read as plain text; every other conversation is the template's
        text encoded, exactly as before (and as transformers gives it)."""
        return self.chat_id_parts(messages, add_generation_prompt)[0]

    def chat_id_parts(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                      split_at: str | None = None) -> list[list[int]]:
        """chat_ids cut where the rendered conversation holds ``split_at`` (which is left out), each part
        encoded on its own: where APE's passages go (the server's tachy.passages). One part without it."""
        parts: list[list[int]] = [[]]
        for text, literal in self._chat_pieces(plain_messages(messages), add_generation_prompt):
            for k, piece in enumerate(text.split(split_at) if split_at else [text]):
                if k:
                    parts.append([])
                if piece:
                    parts[-1] += self.encode_literal(piece) if literal else self.encode(piece, add_special_tokens=False)
        return parts

    def _chat_pieces(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, literal) pieces: literal pieces are the contents of messages
        that spell a special token, rendered as marks and put back here."""
        risky = [i for i, m in enumerate(messages)
                 if isinstance(m.get("content"), str) and any(s in m["content"] for s in self._special_texts)]
        if not risky:
            return [(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt), False)]
        marked = [{**m, "content": CONTENT_MARK.format(i)} if i in risky else m for i, m in enumerate(messages)]
        pieces = re.split("\ue000(\\d+)\ue001",
                          self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt))
        if sorted(int(i) for i in pieces[1::2]) != risky:
            raise InvalidArgumentError("a message holds the text of a special token, and this chat template "
                                       "does not keep its content apart to encode it as text")
        return [(messages[int(piece)]["content"], True) if j % 2 else (piece, False)
                for j, piece in enumerate(pieces)]

    # ---- internals ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _special_texts(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    @functools.cached_property
    def _literal(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special tokens' text as plain text (a copy: flipping the flag on
        the shared one would race with other threads' encodes)."""
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def _set_post_processor(self) -> None:
        """Mirror transformers' TokenizersBackend.update_post_processor."""
        _set_bos_eos_post_processor(self._tok, self.bos_token if self.add_bos_token else None,
                                    self.eos_token if self.add_eos_token else None)


def plain_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages as templates take them: a list of dicts with a role, whose content is a string (OpenAI's
    list of text parts joined) or None; anything else is an InvalidArgumentError, not a template's TypeError."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgumentError(f"message {i}: content parts must be {{'type': 'text', 'text': ...}} "
                                           f"(text only)")
            m = {**m, "content": "".join(p["text"] for p in content)}
        elif content is not None and not isinstance(content, str):
            raise InvalidArgumentError(f"message {i}: content must be a string, a list of text parts or None, "
                                       f"got {type(content).__name__}")
        out.append(m)
    return out


def _encode(backend: tokenizers.Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; a long text through ``encode_batch`` (the same ids), which releases the GIL."""
    try:
        if len(text) > LONG_TEXT:
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    except TypeError:   # the tokenizers library's answer to a str it cannot read as UTF-8
        if isinstance(text, str) and not is_unicode(text):
            raise InvalidArgumentError(
                "the text is not valid Unicode: it holds a lone surrogate (a byte that is not UTF-8, read with "
                "errors='surrogateescape', or an escape such as '\\ud800')") from None
        raise


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
    """InvalidArgumentError unless every id is a row of the model's embedding (the C forward reads the row of
    any id it is given)."""
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise InvalidArgumentError(f"{what} token ids must be in [0, {vocab_size}), got {bad}")


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate: Python (and JSON's \\ud800 escapes) allow them, no tokenizer
    can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _set_bos_eos_post_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e


_ENV = None


@functools.lru_cache(maxsize=32)
def _compiled_template(source: str):  # type: ignore[no-untyped-def]
    """A chat template compiled once: compiling costs ~2 ms, a chat request's whole time to first token is tens."""
    return _jinja_env().from_string(source)


def _jinja_env():  # type: ignore[no-untyped-def]
    """A sandboxed environment configured like transformers' chat template renderer."""
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


# ---- GGUF -> tokenizer files ----------------------------------------------------------------------------------
def gguf_tokenizer(path: str | Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """(fast tokenizer, tokenizer_config dict) from a GGUF's metadata, via transformers' GGUF converter.

    transformers knows the per-family quirks (byte-level BPE pre-tokenizer regexes, Gemma's respelled
    whitespace tokens and rebuilt merges), so we reuse it instead of re-implementing them.
    """
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as e:  # transformers < 5 has a different GGUF API
        raise ModelLoadError(f"reading a GGUF tokenizer needs transformers >= 5 ({e})") from e
    try:
        arch, tokenizer_dict, tok_config = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except Exception as e:  # malformed metadata surfaces as many different exception types
        raise ModelLoadError(f"{path}: cannot build the tokenizer from GGUF metadata: {e}") from e
    config: dict[str, Any] = {
        "tokenizer_class": "TokenizersBackend",   # tokenizer.json describes the whole pipeline
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(tok_config.get("add_bos_token", False)),
        "add_eos_token": bool(tok_config.get("add_eos_token", False)),
        "tachy_source": Path(path).name,
    }
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if tok_config.get(key) is not None:
            config[key] = tok_config[key]
    if tok_config.get("chat_template"):
        config["chat_template"] = tok_config["chat_template"]
    _set_bos_eos_post_processor(backend, config.get("bos_token") if config["add_bos_token"] else None,
                                config.get("eos_token") if config["add_eos_token"] else None)
    return backend, config


def save_tokenizer_files(backend: tokenizers.Tokenizer, config: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ---- streaming ------------------------------------------------------------------------------------------------
class StreamDetokenizer:
    """Incremental decoding that only emits complete characters.

    Byte-level BPE splits one emoji over several tokens; decoding token by token would emit U+FFFD pieces.
    We decode a short window (tokens since the last emission point) twice, without and with the new
    tokens, and emit the new suffix once it no longer ends in U+FFFD. The concatenation of all outputs
    equals ``tok.decode(all_ids)``.
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0   # window start: decoded text from here is re-derived for context
        self._read = 0     # tokens up to here have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a genuinely incomplete byte sequence at the end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        dec = self.tok.decode
        prefix_text = dec(self.ids[self._prefix:self._read], self.skip_special_tokens)
        new_text = dec(self.ids[self._prefix:], self.skip_special_tokens)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text):]
