"""Fail loudly when a virtual environment has drifted from its lock file.

    python requirements/check_lock.py requirements/dev.txt --also torch==2.13.0

Every package the lock pins must be installed at exactly that version, and nothing else may be installed
but pip, tachy itself and the ``--also`` pins (torch, whose build the Makefile picks). A drifted venv is
how a green run on one machine hides what a fresh one installs, so `make test` checks before it runs.
Standard library only: it runs before anything is known to be installed right.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

ALWAYS_ALLOWED = {"pip", "tachy"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a pin without a local label matches any build of that release."""
    return version.split("+", 1)[0]


def read_pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` requirement lines (comments and ``# via`` annotations ignored) -> {name: version}."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"check_lock: {line!r} is not an exact pin (name==version)")
        pins[canonical(name.split("[", 1)[0].strip())] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """Human-readable differences between the pins and what is installed (empty: in sync)."""
    problems = []
    for name, version in sorted(pins.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"missing    {name}=={version}")
        elif got != version and not ("+" not in version and base_version(got) == version):
            problems.append(f"version    {name}: installed {got}, locked {version}")
    for name in sorted(set(have) - set(pins) - ALWAYS_ALLOWED):
        problems.append(f"unlocked   {name}=={have[name]} is installed but not in the lock")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--also", action="append", default=[], help="an extra exact pin (name==version)")
    args = parser.parse_args(argv)
    pins = read_pins(args.lock.read_text().splitlines() + args.also)
    problems = drift(pins, installed())
    if problems:
        print(f"\nThis environment ({sys.prefix}) has drifted from {args.lock}:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        print("Rebuild it from the lock (`make clean` then the same make target), or, if the change is wanted,\n"
              "regenerate the locks with `make lock` and commit them.", file=sys.stderr)
        return 1
    print(f"{sys.prefix} matches {args.lock} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
