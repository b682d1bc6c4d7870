"""Named plug-ins with options in one string: ``"name"`` or ``"name:key=value,key=value"``.

Drafters (``--drafter rest:datastore=store.npz``), presses, decoding strategies and the watermark all take
their options this way, on the command line and in the server's ``tachy`` field, so one parser serves them.
"""
from __future__ import annotations

from .errors import InvalidArgumentError


def parse_value(text: str) -> bool | None | int | float | str:
    """An option value as bool / None / int / float when it reads as one, else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``(name, options)``.

    >>> parse_spec("rest:datastore=store.npz,max_depth=6")
    ('rest', {'datastore': 'store.npz', 'max_depth': 6})
    """
    name, _, opts = spec.partition(":")
    options = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidArgumentError(f"option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = parse_value(value.strip())
    return name.strip(), options


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, where a spec's own options continue it: an item ``key=value`` without
    a name belongs to the spec before it.

    >>> split_specs("dense,quest:budget=2048,dense_layers=2,tidal")
    ['dense', 'quest:budget=2048,dense_layers=2', 'tidal']
    """
    out: list[str] = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        if out and ":" not in item and "=" in item and ":" in out[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out
