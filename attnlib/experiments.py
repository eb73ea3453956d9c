"""The comparison behind the book's last chapter: every head, one schedule, several seeds.

Usage::

    python -m attnlib.experiments --heads all --seeds 3 [--first-seed 0] [--profile quick|full] [--out results]

For each head (the FCN baseline included) and seed ``k`` it trains the network with
:func:`attnlib.models.load_trained` — so a finished run in its checkpoint cache is not
trained twice and an interrupted one resumes — and
writes ``<out>/<profile>/<head>-seed<k>.json`` (atomically; quick and full records never
overwrite each other) with

* ``test``: mIoU, per-class IoU by class name (``null`` for a class absent from both
  prediction and ground truth), pixel accuracy, confusion matrix;
* ``parameters`` (inference, without the auxiliary head) and ``parameters_with_aux``;
* ``flops``: one forward pass at 1×3×360×480 in eval mode, as
  :class:`torch.utils.flop_counter.FlopCounterMode` counts it (convolutions and matrix
  products, 2 per multiply-add; element-wise work is not counted);
* ``peak_memory``: ``torch.cuda.max_memory_allocated`` during training on a GPU; on the
  CPU the process's max RSS, labelled as such (not comparable);
* ``train_images_per_s``, ``train_seconds``, ``wall_seconds``, ``device``, ``torch``,
  ``git_commit`` (``null`` outside a git checkout), ``profile`` and ``schedule``;
* ``curves``: the loss and learning rate of every step and the mIoU of every evaluation.

The quick profile's numbers only show that the pipeline runs; compare heads on ``full``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import HEADS, load_trained
from .train import PROFILES, atomic_write, check_profile, profile

__all__ = ["count_flops", "load_results", "main", "parse_heads", "record_path", "run"]

FLOP_INPUT = (1, 3, 360, 480)


def count_flops(model: nn.Module, shape: tuple[int, int, int, int] = FLOP_INPUT) -> dict:
    """FLOPs of one eval-mode forward pass of ``model`` on a ``shape`` input, by operator."""
    was_training = model.training
    model.eval()
    x = torch.zeros(shape, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "by_op": by_op, "input": list(shape),
            "counted": "torch.utils.flop_counter.FlopCounterMode, eval mode, 2 FLOPs per multiply-add"}


def _finite(obj):
    """Replace NaN/inf by ``None`` so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def record_path(out: str | os.PathLike, profile_name: str, head: str, seed: int) -> Path:
    """Where the record of ``head`` with ``seed`` under ``profile_name`` lives: ``<out>/<profile>/<head>-seed<k>.json``."""
    return Path(out) / check_profile(profile_name) / f"{head}-seed{seed}.json"


def load_results(profile_name: str, out: str | os.PathLike = "results") -> dict[str, list[dict]]:
    """Every record under ``<out>/<profile>/``, as ``{head: [record of seed 0, seed 1, ...]}`` in
    :data:`HEADS` order; heads without a record are left out."""
    folder = Path(out) / check_profile(profile_name)
    found: dict[str, list[dict]] = {}
    for head in HEADS:
        paths = sorted(folder.glob(f"{head}-seed*.json"), key=lambda p: int(p.stem.rsplit("seed", 1)[1]))
        if paths:
            found[head] = [json.loads(p.read_text()) for p in paths]
    return found


def run(head: str, seed: int, profile_name: str, out: str | os.PathLike, *, root: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """Train (or load) one head with one seed under one profile and write its JSON record."""
    schedule = PROFILES[profile_name]
    model, result = load_trained(head, profile_name, root, checkpoint_dir, seed=seed)
    run_info, metrics = result["run"], result["metrics"]
    record = {
        "head": head,
        "seed": seed,
        "profile": profile_name,
        "schedule": asdict(schedule),
        "test": metrics,
        "parameters": sum(p.numel() for name, p in model.named_parameters() if not name.startswith("aux_head.")),
        "parameters_with_aux": sum(p.numel() for p in model.parameters()),
        "flops": count_flops(model),
        "peak_memory": run_info["peak_memory"],
        "train_images_per_s": run_info["images_per_s"],
        "train_seconds": run_info["train_seconds"],
        "wall_seconds": run_info["wall_seconds"],
        "device": run_info["device"],
        "torch": run_info["torch"],
        "git_commit": run_info["git_commit"],
        "curves": result["history"],
    }
    with atomic_write(record_path(out, profile_name, head, seed), "w") as f:
        json.dump(_finite(record), f, indent=1, allow_nan=False)
    return record


def parse_heads(arg: str) -> list[str]:
    """``--heads``: ``"all"`` or comma- or space-separated names from :data:`HEADS`."""
    names = list(HEADS) if arg == "all" else [h for h in arg.replace(",", " ").split() if h]
    unknown = [h for h in names if h not in HEADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown head(s) {unknown}: expected 'all' or names from {HEADS}")
    return names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnlib.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=parse_heads, default=list(HEADS), help="'all' or comma-separated names (default all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds first..N-1 (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--profile", type=check_profile, default=None, help="quick or full (default: attnlib.train.profile())")
    parser.add_argument("--out", default="results", help="folder for the JSON records, one subfolder per profile "
                                                         "(default results)")
    parser.add_argument("--root", default=None, help="CamVid folder (default $ATTNLIB_DATA)")
    parser.add_argument("--checkpoints", default=None, help="checkpoint folder (default $ATTNLIB_CHECKPOINTS or the cache)")
    args = parser.parse_args(argv)
    if not 0 <= args.first_seed < args.seeds:
        parser.error(f"expected 0 <= --first-seed < --seeds, got {args.first_seed} and {args.seeds}")
    profile_name = args.profile or profile()
    for seed in range(args.first_seed, args.seeds):
        for head in args.heads:
            record = run(head, seed, profile_name, args.out, root=args.root, checkpoint_dir=args.checkpoints)
            print(f"{head:9s} seed {seed}  test mIoU {100 * record['test']['miou']:5.1f}%  "
                  f"{record['parameters'] / 1e6:5.2f} M params  {record['flops']['total'] / 1e9:6.1f} GFLOPs  "
                  f"{record['train_images_per_s']:7.1f} img/s  ({profile_name}, {record['device']})", flush=True)


if __name__ == "__main__":
    main()
