"""``python -m attnlib.bench`` runs every block on both paths and reports consistent rows."""
from __future__ import annotations

import json

import pytest

from attnlib import bench


def test_bench_runs_every_block_on_both_paths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--sizes", "1x16x6x7", "--min-run-time", "0.01", "--rounds", "1", "--device", "cpu", "--json", str(out)])
    assert {(r.block, r.path) for r in rows} == {(b, p) for b in bench.BLOCKS for p in ("reference", "fused")}
    assert all(r.ms > 0 and r.gflops > 0 and r.peak_mb is None for r in rows)  # no peak counter on a CPU
    printed = capsys.readouterr().out
    assert "speed-up" in printed and all(name in printed for name in bench.BLOCKS)
    assert len(json.loads(out.read_text())["rows"]) == len(rows)


@pytest.mark.parametrize("size", ["1x512x97", "0x512x97x97", "1xAx97x97"])
def test_bad_size_is_refused(size, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", size])
    assert "BxCxHxW" in capsys.readouterr().err
