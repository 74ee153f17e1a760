"""Read the parts of a Dockerfile that the tests check: stages, ENV, ENTRYPOINT/CMD, COPY.

Only the syntax used in deploy/ is understood: line continuations, comments,
``ENV k=v ...`` and exec-form (JSON) ENTRYPOINT, CMD and HEALTHCHECK CMD.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"legacy `ENV key value` form is not supported: {args!r}")
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        args = self.last(keyword)
        return [] if args is None else json.loads(args)

    def command(self) -> list[str]:
        """The argv a container of this stage runs with no arguments: ENTRYPOINT + CMD."""
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuations joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        if logical:
            keyword, _, args = logical.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def parse(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for keyword, args in instructions(Path(path).read_text()):
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages
