"""bench/context_parallel.py at a toy size: its a2a+p2p row runs with the hierarchical sizes
the bench derives (2 x CP/2) and trains the loss of the single process (the table's loss
column is what says the schemes compute the same attention)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300


def test_bench_a2a_p2p_row_matches_one_process(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "context_parallel.py"), "--seq-lengths",
         "64", "--cp", "1", "4", "--cp-comm-type", "a2a+p2p", "--warmup", "0",
         "--steps", "1", "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["cp"], r["comm"]): r for r in result["rows"]}
    assert sorted(rows) == [(1, "-"), (4, "a2a+p2p 2x2")] and result["skipped"] == []
    for row in rows.values():
        assert row["loss"] == pytest.approx(rows[(1, "-")]["loss"], rel=1e-5)
    assert "| 64 | 4 | a2a+p2p 2x2 |" in proc.stdout
