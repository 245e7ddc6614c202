"""What a sending actor of a Ray run hands back per block, checked without starting Ray: the block's
row-map lines, its report on the first line. Skipped where ray is not installed, except in CI.
"""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

try:
    import ray  # noqa: F401  (runner.distributed.worker needs it)
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the ray extra; a missing ray there is a broken setup, not a skip
    pytest.skip("needs ray: pip install -e '.[ray]'", allow_module_level=True)

from runner.distributed.worker import REPORT, block_output


def test_a_blocks_report_travels_once_not_once_per_row() -> None:
    """A 500-line block with a 360 KB report: the report is on the first line and null on the rest, and
    the block's Arrow buffers hold it once, so what goes to the object store and the driver stays under
    the lines plus twice the report (a report broadcast to every row made such a block 178 MB)."""
    lines = pl.DataFrame({"_row": range(500), "request_key": [f"{i:032x}" for i in range(500)]})
    report = json.dumps({"results": [["x" * 700, None]] * 500})

    table = block_output(lines, report)

    back = pl.from_arrow(table)
    assert isinstance(back, pl.DataFrame)
    assert back.get_column(REPORT).to_list() == [report] + [None] * 499
    assert back.drop(REPORT).equals(lines)
    assert table.nbytes < lines.estimated_size() + 2 * len(report)
