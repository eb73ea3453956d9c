r"""Training and evaluation on CamVid: two schedules, exact resumption, mIoU.

Two profiles share one code path and differ only in their :class:`Schedule`:

* ``"quick"`` — a CPU smoke run (tens of seconds per model, small crops, a few
  test images).  Its mIoU says the pipeline works, **not** how good a head is.
* ``"full"`` — the real run on one GPU, evaluated on the whole test set; sized for
  about five minutes per model on an H100 (an estimate: not yet measured).  The
  chapters are written for this profile, and each prints which profile produced
  its stored outputs.

:func:`profile` picks ``"full"`` when CUDA is available, else ``"quick"``; the
environment variable ``ATTNLIB_PROFILE`` overrides it.

The training data never goes through a ``DataLoader``: the whole train split is
loaded once (:func:`attnlib.data.load_split`, 367 frames, 253 MB as uint8) onto the
training device.  Each step picks its frames there and applies the reader-facing
augmentation, :func:`attnlib.data.train_transforms` (``torchvision.transforms.v2``:
random scale, crop padded with the ignore index, flip, colour jitter, normalisation),
to one frame at a time, as ``tv_tensors.Image`` / ``tv_tensors.Mask`` views of the
preloaded tensors, and stacks the results: the same code as a reader's ``CamVid``
data set, with the pixels never leaving the device.  Evaluation normalises with
:func:`attnlib.data.normalize_batch`, i.e. :func:`attnlib.data.eval_transforms`.

Every random number of the data stream is a pure function of ``(seed, step)``: the
frame order comes from generators seeded by :func:`_seed`, and v2, which draws from
torch's global CPU generator, runs inside ``torch.random.fork_rng`` with that
generator seeded from ``(seed, step)`` (:func:`_train_batch`).  So a resumed run sees
exactly the batches an uninterrupted one would, whatever else drew random numbers
before.  Dropout draws from the global torch generators, whose state the checkpoint
keeps and the augmentation leaves untouched.  On the CPU, "2 steps, save, resume,
2 steps" therefore equals "4 steps" to the last bit (the tests check it); on a GPU,
atomics in some backward kernels (e.g. bilinear upsampling) make runs agree only to
rounding.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from tqdm import tqdm

from . import __version__
from .data import CLASSES, IGNORE_INDEX, NUM_CLASSES, load_split, normalize_batch, train_transforms

__all__ = [
    "BRANCH_WEIGHT",
    "PROFILES",
    "Schedule",
    "atomic_write",
    "check_profile",
    "confusion_matrix",
    "device_name",
    "evaluate",
    "fit",
    "iou_from_confusion",
    "learning_rate",
    "load_checkpoint",
    "profile",
    "seed_everything",
]

CHECKPOINT_FORMAT = 1
# Weight of each per-branch loss of a model with ``branch_names`` (DANet's PAM-only and CAM-only
# classifiers): mmseg's DAHead adds all three of its losses with its loss_decode weight, 1.
BRANCH_WEIGHT = 1.0


@dataclass(frozen=True)
class Schedule:
    """Everything that defines a training run except the model and the seed.

    Args:
        name: the profile's name (``"quick"`` / ``"full"``), recorded in results.
        steps: optimiser steps.
        batch_size: crops per step.
        crop_size: (H, W) of a training crop.
        lr: peak learning rate, reached after ``warmup_steps`` and decayed by
            ``(1 - t)^poly_power`` to zero at the last step.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay; never applied to biases and
            BatchNorm parameters.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum ``momentum``, Nesterov off).
        scale_range, flip, jitter: the augmentation, :func:`attnlib.data.train_transforms`
            (scale factors, horizontal flips on/off, colour jitter on/off).
        aux_weight: weight of the auxiliary head's loss (mmseg: 0.4).
        train_limit: use only the first ``train_limit`` training frames (``None``: all 367).
        eval_limit: evaluate on the first ``eval_limit`` frames of the split (``None``: all).
        eval_every: evaluate every this many steps as well as at the end (0: at the end only).
        eval_batch_size: frames per evaluation batch (full 360×480 frames).
        checkpoint_every: write a resumable checkpoint every this many steps (0: only the final one).
        log_every: record the mean loss and call ``log`` every this many steps.
    """

    name: str
    steps: int
    batch_size: int
    crop_size: tuple[int, int]
    lr: float
    weight_decay: float
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_steps: int = 0
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = True
    aux_weight: float = 0.4
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_every: int = 0
    eval_batch_size: int = 8
    checkpoint_every: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"Schedule.optimizer: expected 'adamw' or 'sgd', got {self.optimizer!r}")
        for field in ("steps", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"Schedule.{field}: expected a positive int, got {getattr(self, field)!r}")
        for field in ("train_limit", "eval_limit"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise ValueError(f"Schedule.{field}: expected None or a positive int, got {getattr(self, field)!r}")


# Why AdamW (both profiles): the network trains from scratch (no ImageNet weights), on 367
# frames, for a few thousand steps.  There the per-parameter step size of AdamW makes early
# progress fast and the learning rate forgiving; mmseg's SGD at lr 0.01 is tuned for
# *pretrained* backbones and 40k-160k steps.  A 24-step CPU comparison (FCN, 32 test
# frames) could not separate them (AdamW 1e-3 / 2e-3: 12.2 / 10.3 % mIoU; SGD 0.01 / 0.02:
# 9.1 / 9.4 %), so the choice rests on that argument, not on a measurement.  Warm-up spares
# the freshly initialised BatchNorm statistics; poly 0.9 is mmseg's decay.
PROFILES: dict[str, Schedule] = {
    # CPU smoke run, measured on 2 idle AMD EPYC cores, torch 2.14: a step takes ~0.47 s at
    # 96×128 (0.72 s at 128×160), so a model takes ~25 s (40 steps, then 8 test frames;
    # book.SECONDS_PER_MODEL, which the chapters quote).  CI trains every head once, so the
    # crop sets most of its time.  In 40 steps the network underfits, so augmentation is
    # light: scale 0.5-1 and no colour jitter.
    "quick": Schedule(
        name="quick", steps=40, batch_size=4, crop_size=(96, 128), lr=2e-3, weight_decay=1e-2,
        warmup_steps=4, scale_range=(0.5, 1.0), jitter=False, train_limit=64, eval_limit=8,
        eval_batch_size=4, log_every=5,
    ),
    # One H100, NOT yet measured: 16 crops of 360×480 per step, 5000 steps = 218 epochs, bf16
    # autocast, channels_last, data and augmentation on the GPU.  At 71 GFLOPs per 360×480
    # forward pass (FCN; the other heads -5 to +3 %), a step costs ~3.5 TFLOP; at an assumed 250-370
    # training images/s a model takes 3.6-5.3 min.  Every result file records the real speed.
    "full": Schedule(
        name="full", steps=5000, batch_size=16, crop_size=(360, 480), lr=1e-3, weight_decay=5e-2,
        warmup_steps=200, eval_every=1000, eval_batch_size=16, checkpoint_every=1000, log_every=50,
    ),
}


# --------------------------------------------------------------------------- profile, seeds


def check_profile(name: str) -> str:
    """Return ``name`` if it is ``"quick"`` or ``"full"``, else raise ``ValueError``."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: expected one of {tuple(PROFILES)}")
    return name


def profile() -> str:
    """``"full"`` when CUDA is available, else ``"quick"``; ``$ATTNLIB_PROFILE`` overrides."""
    env = os.environ.get("ATTNLIB_PROFILE")
    if env is not None:
        try:
            return check_profile(env)
        except ValueError:
            raise ValueError(f"ATTNLIB_PROFILE={env!r}: expected 'quick' or 'full'") from None
    return "full" if torch.cuda.is_available() else "quick"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (which seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed(seed: int, *keys: int) -> int:
    """A 64-bit seed that depends on ``(seed, *keys)`` only: the data stream needs no saved state."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0])


def _generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded with :func:`_seed` ``(seed, *keys)``."""
    return torch.Generator().manual_seed(_seed(seed, *keys))


_EPOCH, _AUGMENT = 0, 1  # stream tags for _seed / _generator


def _batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """Frames of batch ``step``: consecutive slices of one random permutation per epoch."""
    indices: list[torch.Tensor] = []
    position, needed = step * batch_size, batch_size
    while needed:
        epoch, offset = divmod(position, n)
        take = torch.randperm(n, generator=_generator(seed, _EPOCH, epoch))[offset:offset + needed]
        indices.append(take)
        position, needed = position + len(take), needed - len(take)
    return torch.cat(indices)


# --------------------------------------------------------------------------- augmentation


def _train_batch(
    transform: Callable, images: torch.Tensor, labels: torch.Tensor, seed: int, step: int, batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a run: :func:`_batch_indices`' frames through ``transform``, one at a time.

    ``transform`` is :func:`attnlib.data.train_transforms` (a v2 pipeline called as
    ``transform(image, mask)``); each frame goes in as ``tv_tensors.Image`` /
    ``tv_tensors.Mask`` views of ``images[i]`` / ``labels[i]`` on their device.  v2 draws
    every random number from torch's global **CPU** generator (``torch.rand`` /
    ``randint`` / ``randperm`` on the default device, none from a CUDA generator), so
    the calls run inside ``fork_rng(devices=[])`` with that generator alone reseeded
    from ``(seed, step)`` (``torch.manual_seed`` would reseed the CUDA generators too):
    the batch depends on nothing else, and the global stream (dropout) is left as it was.

    Args:
        images: uint8 N×3×H×W.
        labels: integer N×H×W (values 0..11).

    Returns:
        ``(x, y)``: the stacked outputs, plain tensors (float32 B×3×h×w and int64 B×h×w
        for the training pipeline).
    """
    indices = _batch_indices(seed, step, len(images), batch_size).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_seed(seed, _AUGMENT, step))
        pairs = [transform(tv_tensors.Image(images[i]), tv_tensors.Mask(labels[i])) for i in indices]
    x = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
    y = torch.stack([label.as_subclass(torch.Tensor) for _, label in pairs])
    return x, y


# --------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """K×K int64 confusion matrix, rows = target class, columns = predicted class.

    Pixels whose target is ``ignore_index`` are never counted.  Target values outside
    ``0..num_classes-1`` other than ``ignore_index``, or predictions outside
    ``0..num_classes-1``, raise ``ValueError``.
    """
    if pred.shape != target.shape:
        raise ValueError("confusion_matrix: expected pred and target of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(f"confusion_matrix: expected integer class indices, got {pred.dtype} and {target.dtype}")
    pred, target = pred.long().flatten(), target.long().flatten()
    bad_target = (target < 0) | ((target >= num_classes) & (target != ignore_index))
    if bad_target.any():
        raise ValueError(f"confusion_matrix: target values outside 0..{num_classes - 1} (ignore {ignore_index}): "
                         f"{torch.unique(target[bad_target])[:10].tolist()}")
    if ((pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f"confusion_matrix: predictions outside 0..{num_classes - 1}: "
                         f"{torch.unique(pred[(pred < 0) | (pred >= num_classes)])[:10].tolist()}")
    keep = target != ignore_index
    counts = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class IoU = TP / (TP + FP + FN) and their mean.

    A class that appears neither in the targets nor in the predictions has 0/0: its IoU
    is NaN and it is left out of the mean (the convention of mmseg and of most
    benchmarks).  A class that is present but never predicted right has IoU 0 and counts.

    Returns:
        ``(iou, miou)``: float64 K-vector with NaNs, and a float (NaN if every class is absent).
    """
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou, float(iou.nanmean())  # nanmean of all-NaN is NaN


@torch.no_grad()
def evaluate(model: nn.Module, split: str = "test", *, root: str | os.PathLike | None = None,
             device: str | torch.device | None = None, limit: int | None = None, batch_size: int = 8,
             data: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool | None = None) -> dict:
    """mIoU of ``model`` on a CamVid split, on full 360×480 frames (no resizing, no flipping).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        limit: only the first ``limit`` frames.
        data: the split already loaded (``(images uint8 N×3×H×W, labels N×H×W)``, e.g. on the GPU).
        progress: a tqdm bar; ``None`` shows one only when stderr is a terminal.

    Returns:
        ``{"split", "images", "miou", "iou": {class: IoU or None}, "pixel_accuracy",
        "confusion": K×K list}`` (absent classes have IoU ``None``).  The model's
        train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images, labels = data if data is not None else load_split(split, root, limit)[:2]
    images, labels = images[:limit], labels[:limit]
    was_training = model.training
    model.eval()
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long, device=device)
    for start in tqdm(range(0, len(images), batch_size), desc=f"eval {split}", disable=not _show(progress), leave=False):
        x = _to_input(normalize_batch(images[start:start + batch_size].to(device)))
        with _autocast(device):
            pred = model(x).argmax(1)
        cm += confusion_matrix(pred, labels[start:start + batch_size].to(device))
    model.train(was_training)
    iou, miou = iou_from_confusion(cm.cpu())
    return {
        "split": split,
        "images": len(images),
        "miou": miou,
        "iou": {name: (None if math.isnan(v) else v) for name, v in zip(CLASSES, iou.tolist())},
        "pixel_accuracy": float(cm.diagonal().sum() / cm.sum().clamp(min=1)),
        "confusion": cm.tolist(),
    }


# --------------------------------------------------------------------------- devices


def _show(progress: bool | None) -> bool:
    """tqdm writes to stderr: by default show bars only on a terminal (never in a notebook)."""
    return sys.stderr.isatty() if progress is None else progress


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU with native bf16 (Ampere or newer); plain float32 elsewhere.

    Older GPUs (Colab's T4, V100) only emulate bf16, and PyTorch's fused attention kernels
    refuse it there; on a CPU autocast would only slow this network down.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_input(x: torch.Tensor) -> torch.Tensor:
    """channels_last: faster convolutions with cuDNN and with oneDNN on the CPU (~1.6× per CPU training step)."""
    return x.contiguous(memory_format=torch.channels_last)


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "torch.cuda.max_memory_allocated"}
    try:
        import resource  # POSIX only
    except ImportError:
        return {"bytes": None, "kind": "unavailable: no CUDA device and no resource module on this platform"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kind": "process max RSS (ru_maxrss; includes the data and Python, not comparable to CUDA figures)"}


# --------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it onto ``path``.

    ``os.replace`` is atomic, so readers see either the old file or the complete new
    one; if the body raises, the temporary file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, whose files are 0600): the result gets
    # the permissions any new file would get under the user's umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; no-op elsewhere)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _arch(model: nn.Module) -> dict:
    """What must match for weights to be interchangeable: :class:`Segmentor`'s ``arch`` or the class name."""
    return dict(getattr(model, "arch", None) or {"class": type(model).__name__})


def _rng_state() -> dict:
    """Every global generator's state as tensors and plain types (``weights_only`` can load them)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    """Inverse of :func:`_rng_state`; the tensors may have been loaded onto a GPU, the setters want CPU."""
    random.setstate(state["python"])
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.cpu().numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load the weights of checkpoint ``path`` into ``model`` and return the checkpoint dict.

    Uses ``torch.load(weights_only=True)``.  Raises ``ValueError`` naming the difference
    if the checkpoint was written for another architecture (e.g. "expected head
    'nonlocal', got 'fcn'"), before any weight is touched.
    """
    # Loaded on the CPU: load_state_dict copies weights and moments onto the parameters' device,
    # while AdamW's step counters must stay on the CPU (on a GPU each would cost a host sync per step).
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    expected, got = _arch(model), ckpt["arch"]
    if expected != got:
        diffs = "; ".join(f"expected {k} {expected.get(k)!r}, got {got.get(k)!r}"
                          for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k))
        raise ValueError(f"checkpoint {path} was written for another architecture: {diffs}")
    model.load_state_dict(ckpt["model"])
    return ckpt


# --------------------------------------------------------------------------- training


def learning_rate(schedule: Schedule, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then poly decay to 0."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(schedule.steps - schedule.warmup_steps, 1)
    return schedule.lr * (1 - progress) ** schedule.poly_power


def _optimizer(model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """Weight decay on weights only, not on biases, norm scales and the blocks' zero-initialised gains (1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)
    return torch.optim.AdamW(groups, lr=schedule.lr)


def _git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source tree, or ``None`` (not a checkout, no commit, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def fit(
    model: nn.Module,
    schedule: Schedule,
    *,
    root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    eval_split: str | None = "test",
    class_weights: Sequence[float] | None = None,
    progress: bool | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model`` on the CamVid train split under ``schedule``, then evaluate it.

    The train split is preloaded onto ``device`` as uint8; each step augments its
    ``schedule.batch_size`` frames there with :func:`attnlib.data.train_transforms`
    (``schedule.crop_size``, ``scale_range``, ``jitter``, ``flip``; built once per call),
    one frame at a time, and stacks them.  Every random choice of the data stream
    (frames, scales, crops, flips, jitter) is a pure function of ``(seed, step)``.

    Loss: cross-entropy ignoring :data:`IGNORE_INDEX` (optionally ``class_weights``,
    e.g. :data:`attnlib.data.SEGNET_CLASS_WEIGHTS`), plus ``schedule.aux_weight`` times
    the auxiliary head's (when ``model(x, return_aux=True)`` returns one), plus
    :data:`BRANCH_WEIGHT` times each per-branch loss of a model with ``branch_names``
    (DANet's, read through ``return_branches=True``).  On CUDA:
    bf16 autocast and cuDNN autotuning; everywhere, channels_last (the model is converted).

    Args:
        model: a :class:`attnlib.models.Segmentor` (or any module taking ``return_aux``).
        device: default CUDA if available, else CPU.  The model is moved there.
        seed: decides the data order, the augmentation and dropout.  (The initial weights
            are the model's: seed before building it, see :func:`seed_everything`.)
        checkpoint: file for resumable checkpoints (every ``schedule.checkpoint_every``
            steps, and at the end; written atomically).
        resume: if ``checkpoint`` exists, continue from it — or, if that run finished,
            load its weights and return its recorded results without training.  Raises
            ``ValueError`` if it was written for another architecture, schedule, seed or
            class weights.  ``False`` starts afresh and overwrites it.
        eval_split: the split evaluated at the end and every ``schedule.eval_every`` steps
            (default ``"test"``: CamVid's usual reporting split; nothing is selected on
            it); ``None`` skips evaluation.
        progress: a tqdm bar; ``None`` shows one only when stderr is a terminal, so a
            notebook gets no stderr output.
        log: called with a dict every ``schedule.log_every`` steps (``{"event": "train",
            "step", "loss", "lr"}``) and after each evaluation (``{"event": "eval",
            "step", "miou"}``).  An exception raised there stops training (the last
            checkpoint stays).

    Returns:
        ``{"history": {"loss", "lr", "eval"}, "metrics": evaluate(...) or None, "run": {...}}``:
        ``history["loss"][i]`` and ``history["lr"][i]`` belong to step ``i``,
        ``history["eval"]`` holds a ``{"step", "miou"}`` per evaluation; ``run`` records
        the device, torch version, git commit, training seconds and images/s, wall
        seconds (summed over resumed sessions) and peak memory.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The code version is part of the configuration, so a checkpoint cached by another
    # version of attnlib (another head or augmentation) is never silently reused.
    config = {"schedule": asdict(schedule), "seed": seed, "attnlib": f"{__version__}/{CHECKPOINT_FORMAT}",
              "class_weights": None if class_weights is None else [float(w) for w in class_weights]}
    model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(seed)
    optimizer = _optimizer(model, schedule)
    step, history = 0, {"loss": [], "lr": [], "eval": []}
    run = {"train_seconds": 0.0, "train_images": 0, "wall_seconds": 0.0, "peak_memory": None}

    if checkpoint is not None and resume and Path(checkpoint).exists():
        ckpt = load_checkpoint(checkpoint, model)
        if ckpt["config"] != config:
            raise ValueError(f"checkpoint {checkpoint} was written with another configuration: expected "
                             f"{config}, got {ckpt['config']}; use resume=False (or another file) to start afresh")
        history, run = ckpt["history"], ckpt["run"]
        if ckpt["complete"]:
            model.eval()
            return {"history": history, "metrics": ckpt["metrics"], "run": run}
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        step = ckpt["step"]

    started = time.perf_counter()
    images, labels, _ = load_split("train", root, schedule.train_limit)
    images, labels = images.to(device), labels.to(device)
    eval_data = None
    if eval_split is not None:
        eval_data = tuple(t.to(device) for t in load_split(eval_split, root, schedule.eval_limit)[:2])
    weight = None if class_weights is None else torch.tensor(config["class_weights"], device=device)
    augment = train_transforms(schedule.crop_size, schedule.scale_range, schedule.jitter, flip=schedule.flip)

    def save(complete: bool, metrics: dict | None = None) -> None:
        if checkpoint is None:
            return
        state = {"format": CHECKPOINT_FORMAT, "arch": _arch(model), "config": config, "step": step,
                 "complete": complete, "model": model.state_dict(), "history": history, "run": run,
                 "metrics": metrics, "rng": _rng_state()}
        if not complete:  # a finished run has nothing to resume: keep the file small
            state["optimizer"] = optimizer.state_dict()
        with atomic_write(checkpoint) as f:
            torch.save(state, f)

    def run_eval() -> dict:
        result = evaluate(model, eval_split, device=device, batch_size=schedule.eval_batch_size,
                          data=eval_data, progress=progress)
        history["eval"].append({"step": step, "miou": result["miou"]})
        if log is not None:
            log({"event": "eval", "step": step, "miou": result["miou"]})
        return result

    pending: list[torch.Tensor] = []  # losses not yet fetched from the device (one sync per flush)

    def flush() -> None:
        if pending:
            history["loss"].extend(torch.stack(pending).tolist())
            pending.clear()

    branched = bool(getattr(model, "branch_names", ()))
    bar = tqdm(total=schedule.steps, initial=step, desc=f"{_arch(model).get('head', 'train')} ({schedule.name})",
               disable=not _show(progress), dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    while step < schedule.steps:
        lr = learning_rate(schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = _train_batch(augment, images, labels, seed, step, schedule.batch_size)
        with _autocast(device):
            if branched:
                logits, aux, branches = model(_to_input(x), return_aux=True, return_branches=True)
            else:
                (logits, aux), branches = model(_to_input(x), return_aux=True), {}
        loss = F.cross_entropy(logits.float(), y, weight=weight, ignore_index=IGNORE_INDEX)
        if aux is not None:
            loss = loss + schedule.aux_weight * F.cross_entropy(aux.float(), y, weight=weight, ignore_index=IGNORE_INDEX)
        for branch in branches.values():
            loss = loss + BRANCH_WEIGHT * F.cross_entropy(branch.float(), y, weight=weight, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append(loss.detach())
        history["lr"].append(lr)
        step += 1
        run["train_images"] += len(x)
        bar.update()

        logging = step % schedule.log_every == 0 or step == schedule.steps
        evaluating = bool(eval_data is not None and schedule.eval_every and step % schedule.eval_every == 0)
        saving = bool(schedule.checkpoint_every and step % schedule.checkpoint_every == 0)
        if logging or evaluating or saving:
            flush()
        if step < schedule.steps and (evaluating or saving):
            run["train_seconds"] += time.perf_counter() - t0
            if evaluating:
                run_eval()
                model.train()
            if saving:
                run["wall_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save(complete=False)
            t0 = time.perf_counter()
        if logging:  # after the checkpoint, so that an exception raised by log loses nothing
            recent = history["loss"][-schedule.log_every:]
            bar.set_postfix(loss=f"{recent[-1]:.3f}", lr=f"{lr:.2e}")
            if log is not None:
                log({"event": "train", "step": step, "loss": sum(recent) / len(recent), "lr": lr})
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run["train_seconds"] += time.perf_counter() - t0

    metrics = run_eval() if eval_data is not None else None
    model.eval()
    peak = _peak_memory(device)
    run.update({
        "device": device_name(device),
        "torch": str(torch.__version__),
        "git_commit": _git_commit(),
        "images_per_s": run["train_images"] / max(run["train_seconds"], 1e-9),
        # a resumed run: the peak over all its sessions
        "peak_memory": max(filter(None, (peak, run["peak_memory"])), key=lambda p: p["bytes"] or 0),
    })
    run["wall_seconds"] += time.perf_counter() - started
    save(complete=True, metrics=metrics)
    return {"history": history, "metrics": metrics, "run": run}
