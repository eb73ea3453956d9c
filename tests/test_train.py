"""Training loop, metrics and checkpoints: exact resumption, atomic writes, mIoU by hand."""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import replace

import pytest
import torch
from torch import nn
from torchvision import tv_tensors

from attnlib import data, train
from attnlib.data import IGNORE_INDEX
from attnlib.models import build
from conftest import requires_data


# A few steps on a few 32×48 crops: the whole loop, in about a second on a CPU.
TINY = train.Schedule(name="tiny", steps=4, batch_size=2, crop_size=(32, 48), lr=1e-3, weight_decay=1e-2,
                      warmup_steps=1, train_limit=4, checkpoint_every=2, log_every=1)


# --------------------------------------------------------------------------- metrics


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = train.confusion_matrix(pred, target, num_classes=3, ignore_index=IGNORE_INDEX)
    expected = torch.tensor([[1, 1, 0],   # target 0: one right, one called 1
                             [0, 1, 1],   # target 1: one right, one called 2
                             [0, 0, 1]])  # target 2: right; the ignored pixel is nowhere
    assert torch.equal(cm, expected)
    iou, miou = train.iou_from_confusion(cm)
    # IoU_c = TP / (row + column - TP): 1/(2+1-1), 1/(2+2-1), 1/(1+2-1)
    assert torch.allclose(iou, torch.tensor([1 / 2, 1 / 3, 1 / 2], dtype=torch.float64))
    assert miou == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_ignore_index_never_counted():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 12, (4, 36, 48), generator=g)
    pred = torch.randint(0, 11, (4, 36, 48), generator=g)
    cm = train.confusion_matrix(pred, target)
    assert cm.shape == (11, 11)
    assert cm.sum() == (target != IGNORE_INDEX).sum()
    # Changing the predictions at ignored pixels changes nothing.
    assert torch.equal(train.confusion_matrix(torch.where(target == IGNORE_INDEX, 0, pred), target), cm)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = torch.zeros(3, 3, dtype=torch.long)
    cm[0, 0], cm[1, 1], cm[1, 0] = 5, 3, 1  # class 2 neither in target nor predicted
    iou, miou = train.iou_from_confusion(cm)
    assert math.isnan(iou[2])
    assert miou == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert math.isnan(train.iou_from_confusion(torch.zeros(3, 3, dtype=torch.long))[1])


@pytest.mark.parametrize("bad", [12, -1, 255])
def test_labels_outside_range_raise(bad):
    target = torch.tensor([0, 1, bad])
    with pytest.raises(ValueError, match="target values outside 0..10"):
        train.confusion_matrix(torch.tensor([0, 1, 2]), target)


def test_predictions_outside_range_raise():
    with pytest.raises(ValueError, match="predictions outside"):
        train.confusion_matrix(torch.tensor([0, 11]), torch.tensor([0, 1]))


class Constant(nn.Module):
    """Predicts class ``k`` everywhere."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.dummy = k, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full(x.shape[:1] + x.shape[2:], self.k), 11).permute(0, 3, 1, 2).float()


def test_evaluate_counts_only_labelled_pixels():
    images = torch.zeros(3, 3, 8, 10, dtype=torch.uint8)
    labels = torch.zeros(3, 8, 10, dtype=torch.uint8)
    labels[:, :4] = IGNORE_INDEX
    labels[2, 4:, :5] = 3  # 20 road pixels, called sky
    result = train.evaluate(Constant(0), data=(images, labels), batch_size=2)
    assert result["images"] == 3
    assert result["iou"]["Sky"] == pytest.approx(100 / 120)  # 100 right, 20 false positives
    assert result["iou"]["Road"] == 0.0
    assert result["iou"]["Car"] is None  # absent from both: left out of the mean
    assert result["miou"] == pytest.approx((100 / 120 + 0) / 2)
    assert result["pixel_accuracy"] == pytest.approx(100 / 120)


# --------------------------------------------------------------------------- profile, schedule, augmentation


def test_profile_env_override(monkeypatch):
    monkeypatch.delenv("ATTNLIB_PROFILE", raising=False)
    assert train.profile() == ("full" if torch.cuda.is_available() else "quick")
    for name in ("quick", "full"):
        monkeypatch.setenv("ATTNLIB_PROFILE", name)
        assert train.profile() == name
    monkeypatch.setenv("ATTNLIB_PROFILE", "fast")
    with pytest.raises(ValueError, match="ATTNLIB_PROFILE='fast'"):
        train.profile()


def test_learning_rate_warmup_then_poly_to_zero():
    s = replace(TINY, steps=100, warmup_steps=10, lr=0.1)
    assert train.learning_rate(s, 0) == pytest.approx(0.01)
    assert train.learning_rate(s, 9) == pytest.approx(0.1)
    assert train.learning_rate(s, 10) == pytest.approx(0.1)
    assert train.learning_rate(s, 55) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert 0 < train.learning_rate(s, 99) < 0.01


def _frames(n: int = 5, h: int = 24, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A preloaded split as load_split returns it: uint8 images and uint8 labels."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g),
            torch.randint(0, IGNORE_INDEX + 1, (n, h, w), dtype=torch.uint8, generator=g))


def test_training_batch_is_the_v2_pipeline_of_attnlib_data():
    """Batch (seed, step) = data.train_transforms on each of its frames, under a seed from (seed, step)."""
    images, labels = _frames()
    t = data.train_transforms((16, 20), (0.5, 1.5))  # flip and jitter on: every random transform
    x, y = train._train_batch(t, images, labels, seed=3, step=7, batch_size=3)
    assert type(x) is torch.Tensor and x.shape == (3, 3, 16, 20) and x.dtype == torch.float32
    assert type(y) is torch.Tensor and y.shape == (3, 16, 20) and y.dtype == torch.int64
    torch.manual_seed(train._seed(3, train._AUGMENT, 7))
    for k, i in enumerate(train._batch_indices(3, 7, len(images), 3).tolist()):
        image, label = t(tv_tensors.Image(images[i]), tv_tensors.Mask(labels[i]))
        assert torch.equal(x[k], image) and torch.equal(y[k], label)


def test_augmentation_depends_on_seed_and_step_only():
    images, labels = _frames()
    t = data.train_transforms((16, 20), (0.5, 1.5))
    torch.manual_seed(0)
    x, y = train._train_batch(t, images, labels, 3, 7, 4)
    torch.manual_seed(1)
    torch.rand(1000)  # other random numbers drawn before: the batch must not change
    state = torch.get_rng_state()
    x2, y2 = train._train_batch(data.train_transforms((16, 20), (0.5, 1.5)), images, labels, 3, 7, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(torch.get_rng_state(), state)  # and the global stream (dropout's) is untouched
    for seed, step in ((3, 8), (4, 7)):
        assert not torch.equal(train._train_batch(t, images, labels, seed, step, 4)[0], x)


def test_identity_augmentation_gives_the_evaluation_input():
    """No scale, full-size crop, no flip, no jitter: training sees exactly what evaluation sees."""
    images, labels = _frames()
    t = data.train_transforms((24, 32), (1.0, 1.0), jitter=False, flip=False)
    x, y = train._train_batch(t, images, labels, 0, 0, 5)
    order = train._batch_indices(0, 0, 5, 5)
    assert torch.equal(x, data.normalize_batch(images[order]))
    assert torch.equal(y, labels[order].long())


def test_fit_builds_the_augmentation_once_from_the_schedule(monkeypatch):
    images, labels = _frames(n=4, h=36, w=48)
    monkeypatch.setattr(train, "load_split", lambda split, root=None, limit=None: (images, labels, ["f"] * 4))
    calls = []
    real = train.train_transforms

    def spy(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_transforms", spy)
    s = replace(TINY, steps=3, checkpoint_every=0, scale_range=(0.75, 1.25), flip=False, jitter=False)
    train.fit(_fresh_model(), s, eval_split=None, progress=False, device="cpu")
    assert calls == [{"crop_size": (32, 48), "scale_range": (0.75, 1.25), "jitter": False, "flip": False}]


# --------------------------------------------------------------------------- fit and checkpoints


class TinySegmentor(nn.Module):
    """A two-layer stand-in for Segmentor (BN, dropout, auxiliary output): checkpoints of kilobytes."""

    arch = {"head": "tiny"}

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout2d(0.5), nn.Conv2d(8, 11, 1))
        self.aux_head = nn.Conv2d(8, 11, 1)

    def forward(self, x, return_aux=False):
        f = self.features(x)
        return (self.classifier(f), self.aux_head(f)) if return_aux else self.classifier(f)


def _fresh_model(seed: int = 0) -> TinySegmentor:
    train.seed_everything(seed)
    return TinySegmentor()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: its checkpoint and the trained model."""
    path = tmp_path_factory.mktemp("ckpt") / "fcn.pt"
    model = _fresh_model()
    result = train.fit(model, TINY, checkpoint=path, eval_split=None, progress=False, device="cpu")
    return path, model, result


@requires_data
def test_resume_is_exact(tmp_path, finished):
    _, straight, straight_result = finished

    class Interrupt(Exception):
        pass

    def interrupt(event):
        if event["step"] == 2:
            raise Interrupt

    path = tmp_path / "interrupted.pt"
    with pytest.raises(Interrupt):
        train.fit(_fresh_model(), TINY, checkpoint=path, eval_split=None, progress=False, device="cpu", log=interrupt)
    assert not torch.load(path, weights_only=True)["complete"]
    resumed = _fresh_model(seed=123)  # other initial weights: everything must come from the checkpoint
    result = train.fit(resumed, TINY, checkpoint=path, eval_split=None, progress=False, device="cpu")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert result["history"]["loss"] == straight_result["history"]["loss"]
    assert len(result["history"]["loss"]) == TINY.steps


@requires_data
def test_finished_checkpoint_is_loaded_not_retrained(finished, monkeypatch):
    path, trained, result = finished
    monkeypatch.setattr(train, "load_split", lambda *a, **k: pytest.fail("a finished run must not load data"))
    model = _fresh_model(seed=7)
    again = train.fit(model, TINY, checkpoint=path, eval_split=None, progress=False, device="cpu")
    assert again["history"] == result["history"]
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="another configuration"):
        train.fit(_fresh_model(), TINY, seed=1, checkpoint=path, eval_split=None, progress=False, device="cpu")


@requires_data
def test_checkpoint_of_another_architecture_is_refused(tmp_path, finished):
    path = tmp_path / "fcn.pt"
    train.fit(build("fcn"), replace(TINY, steps=1, checkpoint_every=0), checkpoint=path, eval_split=None, progress=False, device="cpu")
    with pytest.raises(ValueError, match="expected head 'nonlocal', got 'fcn'"):
        train.load_checkpoint(path, build("nonlocal"))
    with pytest.raises(ValueError, match="expected aux False, got True"):
        train.load_checkpoint(path, build("fcn", aux=False))
    with pytest.raises(ValueError, match="expected head 'fcn', got 'tiny'"):
        train.load_checkpoint(finished[0], build("fcn"))


@requires_data
def test_checkpoint_write_is_atomic(finished, monkeypatch):
    path, _, _ = finished
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.fit(_fresh_model(), replace(TINY, steps=1), checkpoint=path, resume=False, eval_split=None, progress=False, device="cpu")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert torch.load(path, weights_only=True)["complete"]


def test_atomic_write_keeps_the_old_file_and_normal_permissions(tmp_path):
    path = tmp_path / "result.json"
    with train.atomic_write(path, "w") as f:
        f.write("old")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError), train.atomic_write(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("train_limit", 0), ("eval_limit", -1),
                                          ("optimizer", "adam")])
def test_schedule_refuses_bad_settings(field, value):
    with pytest.raises(ValueError, match=f"Schedule.{field}"):
        replace(TINY, **{field: value})


class TinyBranched(TinySegmentor):
    """TinySegmentor with two per-branch outputs of constant zero logits: each adds log K to the loss."""

    branch_names = ("pam", "cam")

    def forward(self, x, return_aux=False, return_branches=False):
        out = super().forward(x, return_aux)
        if not return_branches:
            return out
        zeros = torch.zeros(x.shape[0], 11, *x.shape[2:], device=x.device) + 0 * self.aux_head.bias.sum()
        return (*out, {name: zeros for name in self.branch_names})


@requires_data
def test_per_branch_losses_are_added_with_mmseg_weight():
    """The trainer adds BRANCH_WEIGHT × the cross-entropy of every branch (DANet's PAM and CAM classifiers)."""
    one_step = replace(TINY, steps=1, checkpoint_every=0)
    plain = train.fit(_fresh_model(), one_step, eval_split=None, progress=False, device="cpu")
    train.seed_everything(0)
    branched = train.fit(TinyBranched(), one_step, eval_split=None, progress=False, device="cpu")
    assert train.BRANCH_WEIGHT == 1.0  # mmseg's DAHead: loss_decode weight 1 on each of its three outputs
    extra = branched["history"]["loss"][0] - plain["history"]["loss"][0]
    assert extra == pytest.approx(2 * train.BRANCH_WEIGHT * math.log(11), rel=1e-5)
