"""Where a benchmark result came from, recorded in every JSON the benches write.

``write_result(path, doc, device)`` adds a ``"run"`` block: the git commit the code was at (with ``dirty``
when the work tree had uncommitted changes, so a figure from uncommitted code says so), the host (the
machine's description and the device the bench ran on), the UTC date and the exact command line. A result
file without that block predates it; bench/results/MANIFEST.md gives such files the commit that added them.
"""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(argv: Optional[list] = None) -> str:
    """The command as it was typed: ``python -m sift.bench.<name> <args>`` for a bench module."""
    argv = sys.argv if argv is None else argv
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else f"python {argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def run_info(device: Optional[str] = None, argv: Optional[list] = None) -> dict:
    """The ``"run"`` block: commit, dirty, host, device, date, command."""
    from sift.bench.serve import machine_description  # the one description of the host, shared with serve

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "host": f"{socket.gethostname()}: {machine_description()}",
            "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(argv)}


def write_result(path, doc: dict, device: Optional[str] = None, argv: Optional[list] = None,
                 indent: int = 2, default=None) -> None:
    """Write ``doc`` as JSON to ``path`` with its ``"run"`` block (see :func:`run_info`) first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_info(device, argv), **doc}, indent=indent, default=default) + "\n")
