"""Published checkpoints: readers load the book's trained models instead of retraining them.

A chapter calls :func:`attnlib.models.load_trained`.  When the checkpoint is not in the
local cache, :func:`fetch` looks it up in :data:`MANIFEST` (``attnlib/published.json``:
file name → SHA-256 and size), downloads it from :data:`RELEASE_URL`, the one place the
address is written, checks the SHA-256 before anything is loaded, and moves it into the
cache atomically.  Any failure (no network, a missing or corrupt file) leaves the cache
untouched and returns ``None`` with a message saying why, and ``load_trained`` trains the
model instead.

A maintainer publishes a full-profile run with::

    python -m attnlib.release --profile full --out release/

which writes, for every finished checkpoint in the cache, a release file (the checkpoint
with its weights in half precision, the optimiser state dropped, the run's record kept)
and prints the manifest entries.  Upload the files to the GitHub release named in
:data:`RELEASE_URL`, write the entries into ``attnlib/published.json`` and commit it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .train import atomic_write, check_profile

__all__ = ["MANIFEST", "RELEASE_URL", "export", "fetch", "main", "sha256"]

# The one place the address of the published weights is written (tests/test_release.py
# checks it belongs to the repository named in _config.yml).
RELEASE_URL = "https://github.com/attnlib/attnlib-book/releases/download/weights-v1"
MANIFEST_FILE = Path(__file__).with_name("published.json")
MANIFEST: dict[str, dict] = json.loads(MANIFEST_FILE.read_text())["files"]
TIMEOUT_S = 60


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, destination: str | os.PathLike, *, url: str | None = None,
          manifest: dict[str, dict] | None = None) -> Path | None:
    """Download published checkpoint ``name`` to ``destination`` if the manifest lists it.

    Returns the path, or ``None`` (with a ``RuntimeWarning`` saying why) when the file is not
    published, cannot be downloaded, or fails its SHA-256 check; ``destination`` is then
    left as it was.
    """
    manifest = MANIFEST if manifest is None else manifest
    entry = manifest.get(name)
    if entry is None:
        return None
    source = f"{(url or RELEASE_URL).rstrip('/')}/{name}"
    destination = Path(destination)
    try:
        with urllib.request.urlopen(source, timeout=TIMEOUT_S) as response, atomic_write(destination) as f:
            digest = hashlib.sha256()
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
            if digest.hexdigest() != entry["sha256"]:  # raising here discards the temporary file
                raise ValueError(f"expected SHA-256 {entry['sha256']}, got {digest.hexdigest()}")
    except (OSError, urllib.error.URLError, ValueError) as error:
        warnings.warn(f"could not use the published checkpoint {source} ({error}); training the model instead",
                      RuntimeWarning, stacklevel=2)
        return None
    return destination


def export(profile: str, checkpoint_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, dict]:
    """Write a release file for every finished ``*-<profile>-seed*.pt`` checkpoint in ``checkpoint_dir``.

    A release file is the checkpoint with its floating-point weights in half precision and
    no optimiser state (:func:`attnlib.train.load_checkpoint` casts them back on loading).
    Returns the manifest entries ``{file name: {"sha256", "bytes"}}``.
    """
    check_profile(profile)
    entries = {}
    for path in sorted(Path(checkpoint_dir).glob(f"*-{profile}-seed*.pt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not ckpt.get("complete"):
            continue
        ckpt.pop("optimizer", None)
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        target = Path(out) / path.name
        with atomic_write(target) as f:
            torch.save(ckpt, f)
        entries[path.name] = {"sha256": sha256(target), "bytes": target.stat().st_size}
    if not entries:
        raise ValueError(f"export: expected finished {profile!r} checkpoints in {checkpoint_dir}, found none")
    return entries


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    from .models import cache_dir

    parser = argparse.ArgumentParser(prog="python -m attnlib.release",
                                     description="Export the finished checkpoints of a profile as release files.")
    parser.add_argument("--profile", type=check_profile, default="full")
    parser.add_argument("--checkpoints", default=None, help="checkpoint folder (default $ATTNLIB_CHECKPOINTS or the cache)")
    parser.add_argument("--out", default="release", help="folder for the release files (default release)")
    args = parser.parse_args(argv)
    entries = export(args.profile, cache_dir(args.checkpoints), args.out)
    print(json.dumps({"files": entries}, indent=1, sort_keys=True))
    print(f"Upload the files in {args.out}/ to {RELEASE_URL}, then put the entries above into {MANIFEST_FILE}.")
    return entries


if __name__ == "__main__":
    main()
