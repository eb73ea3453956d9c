"""One command that makes the book's empirical half real on one GPU.

Usage (from the repository root, on a machine with one GPU)::

    python -m attnlib.publish                       # every head, seed 0, then every chapter
    python -m attnlib.publish --jobs 2 --extra-seeds 2 --budget-minutes 25

It

1. trains every head under the profile (``full`` by default) with seed 0, ``--jobs`` heads
   at a time as separate processes on the one GPU, through ``python -m attnlib.experiments``
   (so each writes ``results/<profile>/<head>-seed0.json``, and an interrupted run resumes
   from its checkpoints when the command is started again);
2. executes every chapter notebook in place under that profile
   (:func:`attnlib.book.execute_notebook`), so that the stored outputs come from those
   models;
3. trains further seeds (``--extra-seeds``) while the time budget allows, for the spread
   that the comparison chapter reports.

Each head's log goes to ``<out>/<profile>/logs/<head>-seed<k>.log``.  Start it in the
background (``setsid python -m attnlib.publish > publish.log 2>&1 &``) and poll the logs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .experiments import load_results, parse_heads
from .models import HEADS
from .train import check_profile

__all__ = ["main", "train_heads"]

ROOT = Path(__file__).resolve().parents[1]


def train_heads(heads: Sequence[str], seed: int, profile: str, out: Path, jobs: int) -> list[int]:
    """Train ``heads`` with ``seed``, ``jobs`` processes at a time; return their exit codes in order."""
    logs = out / profile / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, codes = list(heads), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            head = pending.pop(0)
            log = open(logs / f"{head}-seed{seed}.log", "w")
            command = [sys.executable, "-m", "attnlib.experiments", "--heads", head, "--profile", profile,
                       "--seeds", str(seed + 1), "--first-seed", str(seed), "--out", str(out)]
            running.append((head, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            head, process, log = item
            log.close()
            codes[head] = process.returncode
            running.remove(item)
            print(f"{head:9s} seed {seed}: {'done' if process.returncode == 0 else 'FAILED'} "
                  f"(log {logs / f'{head}-seed{seed}.log'})", flush=True)
    return [codes[h] for h in heads]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnlib.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=check_profile, default="full")
    parser.add_argument("--heads", type=parse_heads, default=list(HEADS), help="'all' or comma-separated names")
    parser.add_argument("--jobs", type=int, default=1, help="heads trained at once on the one GPU (default 1)")
    parser.add_argument("--extra-seeds", type=int, default=0, help="seeds after seed 0, trained while time allows")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no further seed after this many minutes (default: no limit)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="results folder (default results/)")
    parser.add_argument("--notebooks", nargs="*", type=Path, default=None,
                        help="chapters to execute (default all of notebooks/); give none to skip")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.extra_seeds < 0:
        parser.error(f"expected --jobs >= 1 and --extra-seeds >= 0, got {args.jobs} and {args.extra_seeds}")
    started = time.monotonic()
    os.environ["ATTNLIB_PROFILE"] = args.profile  # the notebooks' kernels and the training processes inherit it

    if any(train_heads(args.heads, 0, args.profile, args.out, args.jobs)):
        print("some heads failed: see their logs; notebooks not executed", file=sys.stderr)
        return 1
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb")) if args.notebooks is None else args.notebooks
    if notebooks:
        from .book import execute_notebook  # needs nbclient, installed with the book's requirements

        for path in notebooks:
            t0 = time.monotonic()
            execute_notebook(path)
            print(f"executed {path.name} under {args.profile!r} in {time.monotonic() - t0:.0f} s", flush=True)
    for seed in range(1, args.extra_seeds + 1):
        elapsed = (time.monotonic() - started) / 60
        if args.budget_minutes is not None and elapsed >= args.budget_minutes:
            print(f"budget of {args.budget_minutes} min reached after {elapsed:.1f} min: seeds {seed}.. not trained")
            break
        train_heads(args.heads, seed, args.profile, args.out, args.jobs)
    for head, records in load_results(args.profile, args.out).items():
        mious = ", ".join(f"{100 * r['test']['miou']:.1f}" for r in records)
        print(f"{head:9s} test mIoU {mious} % on {records[0]['test']['images']} frames, {records[0]['device']}")
    print(f"total {(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
