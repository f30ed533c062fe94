"""Each benchmark's quick run, end to end: it runs and reports its figures as JSON (no
timing is asserted: these machines are shared and noisy)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def quick_run(benchmark: str, *arguments: str) -> Any:
    """``python -m benchmarks.<benchmark> --quick --json`` from the project root; its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{benchmark}", "--quick", "--json", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(result.stdout)
