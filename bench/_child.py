"""Run a measured piece of work in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# bench/ at the end of a child's path: its shared pieces (``_losses``) import as in the
# scripts, and no installed package is shadowed by a script's name (merge, align, serve)
_PATH = f"import sys; sys.path.append({str(Path(__file__).resolve().parent)!r})\n"


def run_child(code: str, *args: str) -> dict:
    """Run ``python -c code args...`` (bench/ on its path, last); its last stdout line is a
    JSON object, returned."""
    out = subprocess.run(
        [sys.executable, "-c", _PATH + code, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
