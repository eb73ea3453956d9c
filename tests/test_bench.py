"""``python -m attnlib.bench`` runs every block on both paths (and its plain peer) and reports consistent rows;
each plain transcription in :mod:`attnlib.peers` computes its block's function."""
from __future__ import annotations

import json

import pytest
import torch

from attnlib import bench
from attnlib.peers import PEERS
from conftest import randomize_, set_fused


def test_bench_runs_every_block_on_both_paths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--sizes", "1x16x6x7", "--min-run-time", "0.01", "--rounds", "1", "--device", "cpu", "--json", str(out)])
    assert {(r.block, r.path) for r in rows} == {(b, p) for b in bench.BLOCKS for p in ("reference", "fused")}
    assert all(r.ms > 0 and r.train_ms > 0 and r.gflops > 0 and r.peak_mb is None for r in rows)  # no peak counter on a CPU
    printed = capsys.readouterr().out
    assert "vs fused" in printed and "fwd+bwd ms" in printed and all(name in printed for name in bench.BLOCKS)
    assert len(json.loads(out.read_text())["rows"]) == len(rows)


def test_peers_add_one_plain_row_per_block_with_its_ratio_to_the_fused_path(capsys):
    rows = bench.main(["--sizes", "1x16x5x6", "--blocks", "cam", "isa", "--min-run-time", "0.01", "--rounds", "1",
                       "--device", "cpu", "--peers"])
    assert [(r.block, r.path) for r in rows] == [(b, p) for b in ("cam", "isa") for p in ("reference", "fused", "plain")]
    plain = {r.block: r for r in rows if r.path == "plain"}
    fused = {r.block: r for r in rows if r.path == "fused"}
    assert all(r.attention_mb is None for r in plain.values())
    printed = capsys.readouterr().out
    for name in ("cam", "isa"):
        line = next(line for line in printed.splitlines() if line.startswith(name) and " plain " in line)
        assert f"{plain[name].ms / fused[name].ms:.2f}x/{plain[name].train_ms / fused[name].train_ms:.2f}x" in line


def test_keep_freed_memory_is_asked_for_on_the_command_line_and_said_in_the_header(tmp_path):
    """In a child process: glibc's thresholds change for the whole process, which must not be pytest's."""
    import ctypes.util
    import subprocess
    import sys

    libc = ctypes.util.find_library("c")
    if libc is None or not hasattr(ctypes.CDLL(libc), "mallopt"):
        pytest.skip("needs glibc's mallopt; this C library has none")
    out = tmp_path / "bench.json"
    args = ["--sizes", "1x8x4x4", "--blocks", "gc", "--min-run-time", "0.01", "--rounds", "1", "--device", "cpu",
            "--json", str(out)]
    printed = {}
    for flag in ([], ["--keep-freed-memory"]):
        done = subprocess.run([sys.executable, "-m", "attnlib.bench", *args, *flag], capture_output=True, text=True,
                              check=True)
        printed[bool(flag)] = (done.stdout.splitlines()[0], json.loads(out.read_text())["malloc"])
    for asked, expected in ((False, "default malloc"), (True, "malloc keeps freed memory")):
        header, recorded = printed[asked]
        assert recorded == expected and expected in header


def test_keep_freed_memory_without_mallopt_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bench.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(RuntimeError, match="expected glibc's mallopt"):
        bench.keep_freed_memory()


def test_every_block_has_a_plain_peer():
    assert set(PEERS) == set(bench.BLOCKS)


@pytest.mark.parametrize("name", sorted(bench.BLOCKS))
@pytest.mark.parametrize("size", [(2, 16, 7, 11), (1, 16, 16, 16), (2, 16, 13, 5)], ids=lambda s: "x".join(map(str, s)))
def test_plain_peer_computes_the_blocks_function_in_float64(name, size):
    # 16×16 is divisible by ISA's 8×8 blocks; 7×11 and 13×5 are padded (and masked)
    block = randomize_(bench.BLOCKS[name](size[1]).double().eval(), std=0.3)
    inputs = tuple(t.double() for t in bench.block_inputs(name, size, torch.device("cpu")))
    with torch.no_grad():
        plain = PEERS[name](block, *inputs)
        for fused in (False, True):
            torch.testing.assert_close(set_fused(block, fused)(*inputs), plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(bench.BLOCKS))
def test_plain_peer_has_the_blocks_gradients(name):
    block = randomize_(bench.BLOCKS[name](16).double().eval(), std=0.3)
    inputs = tuple(t.double().requires_grad_() for t in bench.block_inputs(name, (1, 16, 7, 9), torch.device("cpu")))
    params = list(block.parameters())
    grads = [torch.autograd.grad(run(*inputs).sum(), (*inputs, *params), allow_unused=True)
             for run in (block, lambda *xs: PEERS[name](block, *xs))]
    for ours, theirs in zip(*grads):
        if ours is None or theirs is None:
            assert ours is None and theirs is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("size", ["1x512x97", "0x512x97x97", "1xAx97x97"])
def test_bad_size_is_refused(size, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", size])
    assert "BxCxHxW" in capsys.readouterr().err


def test_interleaved_contenders_take_turns_and_time_only_their_own_work():
    """A fake clock and a fake queue: each call queues work that ``synchronize`` waits for, and a
    call after another contender's costs 10 s more (cold caches).  Only warm, whole calls are timed."""
    now, queued, log = [0.0], [0.0], []

    def contender(name: str, seconds: float):
        def call():
            queued[0] += seconds + (10.0 if log and log[-1] != name else 0.0)
            log.append(name)
        return call

    def synchronize():
        now[0] += queued[0]
        queued[0] = 0.0

    calls = {"a": contender("a", 1.0), "b": contender("b", 2.0)}
    times = bench.interleaved_seconds(calls, 6.0, burst=3, min_calls=5, clock=lambda: now[0], synchronize=synchronize)
    # two warm-up calls each, then turns of three until both have ≥ 5 timed calls (3 turns: 6 each)
    # and 2 × 6 s of timed calls in all (2 turns)
    assert log == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3) * 3
    assert times == {"a": [1.0] * 6, "b": [2.0] * 6}
    # the budget is shared: the fast contender does not hold the slow one to 6 s of its own (3 turns)
    log.clear()
    times = bench.interleaved_seconds(calls, 6.0, burst=3, min_calls=2, clock=lambda: now[0], synchronize=synchronize)
    assert log == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # 2 × (2 + 4) s ≥ 2 × 6 s
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4}


@pytest.mark.parametrize("burst", [0, 1])
def test_interleaving_needs_an_untimed_call_per_turn(burst):
    with pytest.raises(ValueError, match=f"at least 2 calls.*got {burst}"):
        bench.interleaved_seconds({"a": lambda: None}, 0.1, burst=burst)


def test_interleave_reports_the_fastest_call_and_the_ratio_of_the_medians(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--sizes", "1x16x5x6", "--blocks", "gc", "cca", "--min-run-time", "0.01", "--rounds", "1",
                       "--device", "cpu", "--peers", "--interleave", "--json", str(out)])
    assert [(r.block, r.path) for r in rows] == [(b, p) for b in ("gc", "cca") for p in ("reference", "fused", "plain")]
    assert all(0 < r.ms <= r.ms_median and 0 < r.train_ms <= r.train_ms_median for r in rows)
    printed = capsys.readouterr().out
    assert "interleaved call by call" in printed.splitlines()[0] and "medians vs fused" in printed
    fused = {r.block: r for r in rows if r.path == "fused"}
    for r in rows:
        if r.path != "fused":
            f = fused[r.block]
            line = next(line for line in printed.splitlines() if line.startswith(r.block) and f" {r.path} " in line)
            assert (f"{r.ms / f.ms:.2f}x/{r.train_ms / f.train_ms:.2f}x"
                    f"{f'{r.ms_median / f.ms_median:.2f}x/{r.train_ms_median / f.train_ms_median:.2f}x':>18}") in line
    assert "interleaved" in json.loads(out.read_text())["method"]


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--burst", "1"), ("--burst", "two")])
def test_bad_counts_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        bench.main([flag, value])
    assert "expected an integer of at least" in capsys.readouterr().err


def test_processes_report_each_time_as_its_median_over_fresh_processes(monkeypatch, tmp_path, capsys):
    """Each process is run here, in this one, through the command line it would get; the table is their medians."""
    runs = []

    def run(command, **kwargs):
        assert command[:3] == [bench.sys.executable, "-m", "attnlib.bench"] and "--processes" not in command
        runs.append(bench.main(command[3:]))
        return bench.subprocess.CompletedProcess(command, 0, stdout="its table\n")

    monkeypatch.setattr(bench.subprocess, "run", run)
    out = tmp_path / "bench.json"
    rows = bench.main(["--sizes", "1x8x4x5", "--blocks", "cam", "--min-run-time", "0.01", "--rounds", "1",
                       "--device", "cpu", "--peers", "--interleave", "--burst", "2", "--processes", "3",
                       "--json", str(out)])
    assert len(runs) == 3 and all(r.ms_median is not None for run in runs for r in run)  # the settings went through
    for i, row in enumerate(rows):
        for field in ("ms", "train_ms", "ms_median", "train_ms_median"):
            assert getattr(row, field) == sorted(getattr(run[i], field) for run in runs)[1]
    fused = rows[1]
    assert [r.path for r in rows] == ["reference", "fused", "plain"] and fused.vs_fused is None
    for i in (0, 2):
        assert rows[i].vs_fused[0] == sorted(run[i].ms / run[1].ms for run in runs)[1]
        assert rows[i].vs_fused[3] == sorted(run[i].train_ms_median / run[1].train_ms_median for run in runs)[1]
    printed = capsys.readouterr()
    header = [line for line in printed.out.splitlines() if line.startswith("attnlib.bench on")][-1]  # the last: ours
    assert "median of 3 processes" in header and "process 3 of 3:\nits table" in printed.err
    assert "median of 3 processes" in json.loads(out.read_text())["method"]


def test_median_rows_takes_the_ratios_within_each_process():
    """A machine twice as fast in one process changes the times, not the ratios: the median ratio
    (1.0 here) is not the ratio of the median times (15 / 12 = 1.25)."""
    def run(fused: float, plain: float) -> list:
        return [bench.Row("cam", "1x8x4x5", path, "float32", ms, 2 * ms, 0.1, None, None)
                for path, ms in (("fused", fused), ("plain", plain))]

    rows = bench.median_rows([run(10.0, 10.0), run(20.0, 16.0), run(12.0, 15.0)])
    assert (rows[0].ms, rows[1].ms) == (12.0, 15.0)
    assert rows[1].vs_fused == [1.0, 1.0, None, None] and rows[0].vs_fused is None
    assert "1.00x/1.00x" in bench.format_table(rows).splitlines()[-1]


def test_median_rows_refuses_runs_of_different_rows():
    row = bench.Row("cam", "1x8x4x5", "fused", "float32", 1.0, 2.0, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="same rows in the same order"):
        bench.median_rows([[row], [bench.replace(row, path="plain")]])
