"""runs/diffcoder_05b/report.py: the model card states numbers of the shipped weights only."""
import json
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "runs" / "diffcoder_05b"
sys.path.insert(0, str(RUN))

import report  # noqa: E402


def test_every_committed_result_of_diffcoder_05b_was_made_by_the_shipped_weights():
    shipped = report.adapter_facts()["sha"]
    assert report.stale_results(shipped) == []
    evaluated = [g for g in RUN.glob("results/*/*/generation.json")
                 if json.loads(g.read_text())["model"] == report.MODEL]
    assert evaluated and len(report.stale_results("0" * 64)) == len(evaluated)
