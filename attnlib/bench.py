"""Benchmark every block: ``python -m attnlib.bench``.

For each block and each size it prints the time of the reference and the fused path, for a
forward pass (``torch.no_grad``) and for a training step (forward and backward, with respect to
the input and every parameter); the analytic FLOPs (:mod:`attnlib.complexity`), the attention
memory the path stores (analytic), and on CUDA the measured peak memory of the forward pass
(``torch.cuda.max_memory_allocated`` above the inputs) and the bf16-autocast times as well.  On a
CPU, PyTorch exposes no peak-memory counter, so the measured column reads ``n/a`` there.

``--peers`` adds a third contender per block: its plain transcription from :mod:`attnlib.peers`
(``bmm`` → ``softmax`` → ``bmm``, as mmcv/mmsegmentation and the official code write it, with the
block's own weights), so that anyone can check, without installing those libraries, that the
fused path is at least as fast as the obvious code.  The ``vs fused`` column gives each row's
time over the fused path's, forward / training step: above 1 the fused path is faster.

All contenders of a block alternate for ``--rounds`` rounds (``torch.utils.benchmark`` medians);
each keeps its best median, so that a burst of load on a shared machine, or whichever runs
first, does not decide the ratio.  Timings on shared machines are noisy: compare ratios taken
within one run.

``--interleave`` alternates the contenders call by call instead (:func:`interleaved_seconds`):
turns of ``--burst`` calls each, as many for every contender, for ``--rounds`` ×
``--min-run-time`` seconds of timed calls per contender on average.  Load that comes and goes
on a shared machine then falls on every contender alike, rather than on whichever round it hit.
A row's time is the fastest call, the least disturbed measurement of the computation (the
rule of Python's ``timeit``); the ratio of the medians follows it in the table.  Each
contender has its own copy of the block, with the same weights.

``--processes N`` runs the whole measurement N times, each in a fresh process, and reports each
row's times, and each ratio to the fused path (taken within each process), as their medians
over the N.  Ratios near 1.0 move between processes by more than within one (each process
places its contenders' memory once), so a table to quote is best taken this way.

``--keep-freed-memory`` (glibc only) makes ``malloc`` keep freed memory in the process, as
jemalloc and TCMalloc do; see :func:`keep_freed_memory`.  Without it, on a CPU, a block whose
step takes milliseconds can spend much of it in page faults, and how much depends on the
allocation history of the whole run.

Examples::

    python -m attnlib.bench                               # 1×512×97×97 and 1×512×64×64
    python -m attnlib.bench --sizes 1x512x64x64 2x128x45x60 --peers
    python -m attnlib.bench --sizes 1x512x64x64 2x128x45x60 --peers --keep-freed-memory
    python -m attnlib.bench --sizes 1x512x64x64 2x128x45x60 --peers --keep-freed-memory --interleave
    python -m attnlib.bench --sizes 2x128x45x60 --peers --interleave --processes 3
    python -m attnlib.bench --sizes 1x512x45x60 --blocks nonlocal cca --json bench.json
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which logs a warning at import on machines that
# have a CUDA toolkit but no GPU.  Nothing here compiles extensions: keep that noise out of the
# notebooks' stderr, for the import only.
_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
try:
    from torch.utils import benchmark
finally:
    _cpp_extension_log.setLevel(_level)

from . import complexity
from .core import set_fused
from .ann import AFNB, APNB
from .ccnet import CrissCrossAttention, RecurrentCrissCross
from .danet import ChannelAttention, PositionAttention
from .gcnet import ContextBlock, SimplifiedNonLocal2d
from .isanet import InterlacedSparseAttention
from .nonlocal_block import NonLocal2d
from .peers import PEERS

# Each block at a channel count c, with the settings its paper (or mmsegmentation) uses.
BLOCKS: dict[str, Callable[[int], nn.Module]] = {
    "nonlocal": lambda c: NonLocal2d(c, c // 2),
    "gc": lambda c: ContextBlock(c, ratio=1 / 4),
    "simplified-nl": lambda c: SimplifiedNonLocal2d(c),
    "pam": lambda c: PositionAttention(c, reduction=8),
    "cam": lambda c: ChannelAttention(c),
    "cca": lambda c: CrissCrossAttention(c, reduction=8),
    "rcca": lambda c: RecurrentCrissCross(c, reduction=8, recurrence=2),
    "apnb": lambda c: APNB(c, c, c // 2, c // 2),
    "afnb": lambda c: AFNB(c // 2, c, c, c // 2, c // 2),
    "isa": lambda c: InterlacedSparseAttention(c, c // 2, c // 2, c, down_factor=(8, 8)),
}
DEFAULT_SIZES = ("1x512x97x97", "1x512x64x64")


@dataclass
class Row:
    block: str
    size: str
    path: str  # "reference", "fused" or "plain" (the attnlib.peers transcription)
    dtype: str
    ms: float  # forward pass, no_grad: the best median, or with --interleave the fastest call
    train_ms: float  # forward and backward, likewise
    gflops: float
    attention_mb: float | None  # None for the plain peer
    peak_mb: float | None
    ms_median: float | None = None  # --interleave only: the median call
    train_ms_median: float | None = None
    # --processes only: the medians over the processes of the ratios to the fused path (see _ratios)
    vs_fused: list[float | None] | None = None


def keep_freed_memory() -> None:
    """Make glibc's ``malloc`` keep freed memory mapped in this process, as jemalloc and TCMalloc do.

    By default glibc gives large freed blocks back to the kernel (``munmap`` above its mmap
    threshold, heap trimming above its trim threshold), so the next allocation of that size
    faults in every 4 KiB page of it again.  A training step of a block allocates maps of
    megabytes, and on a 2-core CPU those faults can cost up to a third of its time, more or less
    depending on what the process allocated before.  With both thresholds raised, every
    contender reuses memory that stays mapped, and the times measure the computation.
    PyTorch's performance tuning guide recommends jemalloc or TCMalloc on CPUs for the same
    reason.  This changes the whole process, for good: the command line asks for it, never
    the library.
    """
    path = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(path), "mallopt", None) if path else None
    if mallopt is None:
        raise RuntimeError("--keep-freed-memory: expected glibc's mallopt, "
                           f"but this C library ({path}) has none")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1)):
        if mallopt(option, value) != 1:
            raise RuntimeError(f"--keep-freed-memory: glibc's mallopt refused option {option} = {value}")


def parse_size(text: str) -> tuple[int, int, int, int]:
    """``"1x512x97x97"`` → ``(1, 512, 97, 97)``."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size BxCxHxW of positive ints, e.g. 1x512x97x97, got {text!r}")
    return tuple(int(p) for p in parts)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isdigit() and int(text) >= low):
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {text!r}")
        return int(text)
    return parse


def block_inputs(name: str, size: tuple[int, int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    b, c, h, w = size
    high = torch.randn(b, c, h, w, device=device)
    return (torch.randn(b, c // 2, h, w, device=device), high) if name == "afnb" else (high,)


def _autocast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype):
    return torch.autocast(inputs[0].device.type, dtype=dtype, enabled=dtype != torch.float32)


def _forward(block: Callable, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    autocast = _autocast(inputs, dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return block(*inputs)
    return forward


def _training_step(block: Callable, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype,
                   parameters: list[nn.Parameter]) -> Callable[[], None]:
    autocast = _autocast(inputs, dtype)
    inputs = tuple(t.detach().requires_grad_() for t in inputs)

    def step() -> None:
        for t in (*inputs, *parameters):
            t.grad = None  # as after zero_grad(set_to_none=True): every step writes fresh gradients
        with autocast:
            out = block(*inputs)
        out.float().sum().backward()
    return step


def _seconds(stmt: Callable, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_seconds(calls: dict[str, Callable[[], object]], min_run_time: float, *, burst: int = 3,
                        min_calls: int = 5, clock: Callable[[], float] = time.perf_counter,
                        synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of every timed call of each contender, the contenders taking turns.

    After two warm-up calls each, the contenders take turns of ``burst`` calls, until each has
    been timed at least ``min_calls`` times and all together for ``min_run_time`` seconds per
    contender.  Every contender gets as many calls as the others: a path ten times slower
    than the fastest does not run for ten times its budget.  The first call of a turn is not
    timed: it pays for the caches the previous contender left.  ``synchronize``
    (``torch.cuda.synchronize`` on a GPU) runs after every call, so that a time covers the
    work the call queued and no earlier work.
    """
    if burst < 2:
        raise ValueError(f"expected a burst of at least 2 calls (the first is not timed), got {burst}")
    if not calls:
        raise ValueError("expected at least one contender to time, got none")
    for call in calls.values():
        for _ in range(2):
            call()
            synchronize()
    times: dict[str, list[float]] = {name: [] for name in calls}
    budget, spent = min_run_time * len(calls), 0.0
    first = next(iter(calls))  # every contender has as many timed calls as the first
    while spent < budget or len(times[first]) < min_calls:
        for name, call in calls.items():
            call()
            synchronize()
            for _ in range(burst - 1):
                start = clock()
                call()
                synchronize()
                times[name].append(clock() - start)
                spent += times[name][-1]
    return times


def time_forward(block: Callable, inputs: tuple[torch.Tensor, ...], *, dtype: torch.dtype = torch.float32,
                 min_run_time: float = 1.0) -> float:
    """Median seconds of one ``block(*inputs)`` under ``no_grad`` (``torch.utils.benchmark``)."""
    return _seconds(_forward(block, inputs, dtype), min_run_time)


def time_training_step(block: Callable, inputs: tuple[torch.Tensor, ...], *, parameters=None,
                       dtype: torch.dtype = torch.float32, min_run_time: float = 1.0) -> float:
    """Median seconds of one forward and backward pass of ``block(*inputs).sum()``.

    Gradients flow to the inputs and to ``parameters`` (default: ``block``'s own, if it is a module).
    """
    if parameters is None:
        parameters = list(block.parameters()) if isinstance(block, nn.Module) else []
    return _seconds(_training_step(block, inputs, dtype, list(parameters)), min_run_time)


def peak_memory(block: nn.Module, inputs: tuple[torch.Tensor, ...], *, dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes a CUDA forward pass allocates above what was allocated before it; ``None`` on a CPU."""
    if inputs[0].device.type != "cuda":
        return None
    forward = _forward(block, inputs, dtype)
    forward()  # warm-up: kernels and workspaces chosen
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(name: str, size, device: torch.device, dtype: torch.dtype, min_run_time: float,
            rounds: int = 3, peers: bool = False, interleave: bool = False, burst: int = 3) -> list[Row]:
    """The reference and the fused path of one block (and its plain peer), timed in alternating rounds.

    Each contender's time is the smallest of its ``rounds`` medians, for the forward pass and
    the training step alike.  With ``interleave``, the contenders alternate call by call
    instead (:func:`interleaved_seconds`, ``rounds * min_run_time`` seconds per path), and a
    contender's time is its fastest call; the median call is kept beside it.
    """
    b, c, h, w = size
    block = BLOCKS[name](c).to(device).eval()
    inputs = block_inputs(name, size, device)
    paths = ["reference", "fused"] + (["plain"] if peers else [])
    plain = PEERS[name]

    def contender(path: str, block: nn.Module) -> Callable:
        if path == "plain":
            return lambda *xs: plain(block, *xs)
        set_fused(block, path == "fused")
        return block

    if interleave:
        # One copy of the block per contender: switching a shared block's path between calls
        # would be timed with them, and each training step writes its own gradients.
        copies = {path: copy.deepcopy(block) for path in paths}
        synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        seconds = {}
        for kind, make in (("forward", lambda run, own: _forward(run, inputs, dtype)),
                           ("train", lambda run, own: _training_step(run, inputs, dtype, list(own.parameters())))):
            seconds[kind] = interleaved_seconds(
                {path: make(contender(path, own), own) for path, own in copies.items()},
                rounds * min_run_time, burst=burst, synchronize=synchronize)
        times = {path: [min(seconds["forward"][path]), min(seconds["train"][path])] for path in paths}
        medians = {path: [statistics.median(seconds["forward"][path]), statistics.median(seconds["train"][path])]
                   for path in paths}
    else:
        parameters = list(block.parameters())
        times = {path: [float("inf"), float("inf")] for path in paths}
        for _ in range(rounds):
            for path in paths:
                run = contender(path, block)
                best = times[path]
                best[0] = min(best[0], time_forward(run, inputs, dtype=dtype, min_run_time=min_run_time))
                best[1] = min(best[1], time_training_step(run, inputs, parameters=parameters, dtype=dtype,
                                                          min_run_time=min_run_time))
        medians = {path: [None, None] for path in paths}
    element = torch.finfo(dtype).bits // 8
    rows = []
    for path in paths:
        run = contender(path, block)
        peak = peak_memory(run, inputs, dtype=dtype)
        memory = (None if path == "plain"  # the analytic formulas describe attnlib's two paths only
                  else complexity.attention_memory(block, b, h, w, bytes_per_element=element) / 2**20)
        forward_median, train_median = (None if m is None else m * 1e3 for m in medians[path])
        rows.append(Row(name, "x".join(map(str, size)), path, str(dtype).removeprefix("torch."),
                        times[path][0] * 1e3, times[path][1] * 1e3,
                        sum(complexity.flops(block, b, h, w).values()) / 1e9, memory,
                        None if peak is None else peak / 2**20, forward_median, train_median))
    return rows


def _ratios(row: Row, fused: Row) -> list[float | None]:
    """``row``'s times over ``fused``'s: forward, training step, and those of the median calls (or None)."""
    medians = row.ms_median is not None and fused.ms_median is not None
    return [row.ms / fused.ms, row.train_ms / fused.train_ms,
            row.ms_median / fused.ms_median if medians else None,
            row.train_ms_median / fused.train_ms_median if medians else None]


def _fused_rows(rows: list[Row]) -> dict[tuple[str, str, str], Row]:
    return {(r.block, r.size, r.dtype): r for r in rows if r.path == "fused"}


def format_table(rows: list[Row]) -> str:
    """One line per row; ``vs fused`` is the row's time over the fused path's, forward / training step.

    Rows timed with ``--interleave`` also carry their medians, whose ratio gets a column of its own.
    With ``--processes``, each ratio is its median over the processes.
    """
    medians = any(r.ms_median is not None for r in rows)
    head = (f"{'block':<14}{'size':<14}{'path':<10}{'dtype':<9}{'fwd ms':>10}{'fwd+bwd ms':>12}{'vs fused':>15}"
            + (f"{'medians vs fused':>18}" if medians else "") + f"{'GFLOPs':>9}{'attn MB':>10}{'peak MB':>9}")
    lines, fused = [head, "-" * len(head)], _fused_rows(rows)
    for r in rows:
        f = fused.get((r.block, r.size, r.dtype))
        compared = f is not None and r is not f
        forward, train, forward_median, train_median = (
            (r.vs_fused if r.vs_fused is not None else _ratios(r, f)) if compared else [None] * 4)
        ratio = (f"{forward:.2f}x/{train:.2f}x" if compared else "").rjust(15)
        if medians:
            ratio += (f"{forward_median:.2f}x/{train_median:.2f}x" if forward_median is not None else "").rjust(18)
        peak = "n/a" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        memory = "-" if r.attention_mb is None else f"{r.attention_mb:.1f}"
        lines.append(f"{r.block:<14}{r.size:<14}{r.path:<10}{r.dtype:<9}{r.ms:>10.2f}{r.train_ms:>12.2f}{ratio}"
                     f"{r.gflops:>9.2f}{memory:>10}{peak:>9}")
    return "\n".join(lines)


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """The rows of several runs of the same measurement: each time, and each ratio to the fused path, its median.

    The ratios are taken within each run and then their median: a machine that runs faster in
    one process than in another changes the times, not the ratios.
    """
    keys = [[(r.block, r.size, r.path, r.dtype) for r in run] for run in runs]
    if any(k != keys[0] for k in keys):
        raise ValueError("median_rows: expected runs of the same rows in the same order, got different rows")

    def median(values: list[float | None]) -> float | None:
        return None if None in values else statistics.median(values)

    fused = [_fused_rows(run) for run in runs]
    rows = []
    for same in zip(*runs):
        row = replace(same[0], **{f: median([getattr(r, f) for r in same])
                                  for f in ("ms", "train_ms", "ms_median", "train_ms_median", "peak_mb")})
        key = (row.block, row.size, row.dtype)
        if row.path != "fused" and key in fused[0]:
            ratios = [_ratios(r, by_key[key]) for r, by_key in zip(same, fused)]
            row = replace(row, vs_fused=[median(list(values)) for values in zip(*ratios)])
        rows.append(row)
    return rows


def _in_processes(args: argparse.Namespace) -> list[Row]:
    """Run the measurement ``args`` asks for in ``args.processes`` fresh processes, one after the other."""
    argv = ["--sizes", *("x".join(map(str, s)) for s in args.sizes), "--blocks", *args.blocks,
            "--device", args.device, "--min-run-time", str(args.min_run_time), "--rounds", str(args.rounds),
            "--burst", str(args.burst)]
    argv += [flag for flag, on in (("--interleave", args.interleave), ("--peers", args.peers),
                                   ("--keep-freed-memory", args.keep_freed_memory)) if on]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.processes):
            path = os.path.join(folder, f"{i}.json")
            done = subprocess.run([sys.executable, "-m", "attnlib.bench", *argv, "--json", path],
                                  stdout=subprocess.PIPE, text=True, check=True)
            print(f"process {i + 1} of {args.processes}:\n{done.stdout}", file=sys.stderr, flush=True)
            with open(path) as f:
                runs.append([Row(**row) for row in json.load(f)["rows"]])
    return median_rows(runs)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m attnlib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size(s) for s in DEFAULT_SIZES],
                        metavar="BxCxHxW", help="input sizes (default: %(default)s)")
    parser.add_argument("--blocks", nargs="+", choices=sorted(BLOCKS), default=list(BLOCKS), metavar="NAME",
                        help=f"blocks to run, from {', '.join(BLOCKS)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--rounds", type=_at_least(1), default=3,
                        help="alternating rounds per path; the best median counts")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate the paths call by call, as many calls each, for rounds × min-run-time "
                             "seconds per path; the fastest call counts, and the medians' ratio is shown beside it")
    parser.add_argument("--burst", type=_at_least(2), default=3,
                        help="with --interleave, calls per turn; the first of each is not timed (default: 3)")
    parser.add_argument("--peers", action="store_true",
                        help="also time each block's plain transcription (attnlib.peers), with the block's weights")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory mapped (glibc's mallopt), so that times leave out page faults")
    parser.add_argument("--processes", type=_at_least(1), default=1,
                        help="run it all this many times, each in a fresh process, and report each time, and "
                             "each ratio to the fused path, as its median over them")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.keep_freed_memory and args.processes == 1:
        keep_freed_memory()
    malloc = "malloc keeps freed memory" if args.keep_freed_memory else "default malloc"
    device = torch.device(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    method = (f"paths interleaved call by call, fastest call (turns of {args.burst})" if args.interleave
              else f"median times, best of {args.rounds} alternating rounds")
    if args.processes > 1:
        method += f"; each time the median of {args.processes} processes"
    header = (f"attnlib.bench on {name}, torch {torch.__version__}, {malloc}; {method}; a forward pass "
              f"(no_grad) and a forward and backward pass")
    if args.processes > 1:
        rows = _in_processes(args)  # each process prints its own header and table, to stderr here
        print(header, flush=True)
    else:
        print(header, flush=True)
        rows = []
        for size in args.sizes:
            for block in args.blocks:
                for dtype in dtypes:
                    new = measure(block, size, device, dtype, args.min_run_time, args.rounds, args.peers,
                                  args.interleave, args.burst)
                    rows.extend(new)
                    print("\n".join(format_table(rows).splitlines()[-len(new):]), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "malloc": malloc, "method": method,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
