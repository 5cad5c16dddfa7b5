"""runs/diffcoder_05b/report.py: the model card states numbers of the shipped weights only, and
the committed documents hold what the script generates from the committed files."""
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


def test_the_model_card_and_replication_doc_hold_what_report_py_generates():
    """A result, benchmark or training record changed without `python runs/diffcoder_05b/report.py`
    run afterwards leaves the documents stale: this fails until it is run."""
    block = report.generated_block()
    for doc in (report.CARD, report.DOC):
        assert report.generated_section(doc) == block, f"{doc}: run python runs/diffcoder_05b/report.py"
