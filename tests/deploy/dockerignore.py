"""Which files of a directory a Docker build context keeps, per its .dockerignore.

Docker's rules: patterns are matched against slash-separated paths relative to the
context root; ``*`` and ``?`` stay within one path segment, ``**`` spans any number;
a pattern that matches a directory matches everything below it; the last matching
pattern wins and a leading ``!`` re-includes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def _regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def rules(dockerignore: Path) -> list[tuple[bool, str, re.Pattern]]:
    """(excludes, pattern, regex) per pattern line, in file order."""
    parsed = []
    for line in Path(dockerignore).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            parsed.append((not negated, pattern, _regex(pattern)))
    return parsed


def is_excluded(relative_path: str, patterns: list[tuple[bool, str, re.Pattern]]) -> bool:
    parts = relative_path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for excludes, _, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = excludes
    return excluded


def _may_reinclude(directory: str, patterns: list[tuple[bool, str, re.Pattern]]) -> bool:
    """Whether some ``!`` pattern could match a path below an excluded ``directory``."""
    for excludes, pattern, _ in patterns:
        if not excludes:
            literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
            if literal.startswith(directory + "/") or directory.startswith(literal) or literal == directory:
                return True
    return False


def context_files(root: Path) -> list[str]:
    """Relative paths of the regular files under ``root`` that the build context keeps."""
    root = Path(root)
    patterns = rules(root / ".dockerignore")
    kept = []
    for directory, subdirs, files in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        # Skip excluded trees (.git, .venv) that no exception can reach, as Docker does.
        subdirs[:] = sorted(
            d for d in subdirs
            if not is_excluded(prefix + d, patterns) or _may_reinclude(prefix + d, patterns)
        )
        kept.extend(prefix + f for f in sorted(files) if not is_excluded(prefix + f, patterns))
    return kept
