"""Run a measured piece of work in a fresh process, so its peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(code: str, *args: str) -> dict:
    """Run ``python -c code args...``; its last stdout line is a JSON object, returned."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
