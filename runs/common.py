"""Helpers shared by runs/replication.py and runs/export_default.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def eval_bench(model_dir: Path, bench: str, outdir: Path, flags: list[str], limit: int | None = None) -> dict[str, Any]:
    """pass@k of `model_dir` on `bench` through `diffcoder eval` (sandboxed); its results.json."""
    cmd = [sys.executable, "-m", "diffcoder.cli", "eval", bench, "--model", str(model_dir), "--out", str(outdir),
           "--batch-size", "16", "--no-progress", *flags, *(["--limit", str(limit)] if limit else [])]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((outdir / "results.json").read_text())
