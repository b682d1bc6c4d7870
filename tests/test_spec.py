"""One parser for ``name:key=value,...`` plug-in specs (drafters, presses, strategies, the watermark)."""
from __future__ import annotations

import doctest

import pytest

import tachy.spec
from tachy.errors import InvalidArgumentError
from tachy.spec import parse_spec


def test_doctests():
    assert doctest.testmod(tachy.spec).failed == 0


def test_values_are_typed_when_they_read_as_one():
    assert parse_spec("sam") == ("sam", {})
    assert parse_spec("x:a=1, b=0.5,c=true,d=None,e=text,f=FALSE") == \
        ("x", {"a": 1, "b": 0.5, "c": True, "d": None, "e": "text", "f": False})
    assert parse_spec(" name : k = v ") == ("name", {"k": "v"})
    assert parse_spec("name:path=/tmp/a=b") == ("name", {"path": "/tmp/a=b"})   # the first '=' splits


@pytest.mark.parametrize("bad", ["x:novalue", "x:=3", "x:a=1,b"])
def test_an_option_without_key_and_value_is_an_error(bad):
    with pytest.raises(InvalidArgumentError, match="is not key=value"):
        parse_spec(bad)


def test_split_specs_keeps_a_specs_options_together():
    from tachy.spec import split_specs

    assert split_specs("dense,quest:budget=2048,dense_layers=2,tidal") == \
        ["dense", "quest:budget=2048,dense_layers=2", "tidal"]
    assert split_specs("snapkv, ,h2o") == ["snapkv", "h2o"]
    assert split_specs("a=1") == ["a=1"]   # no spec before it: left for the name check to refuse
