"""The machinery of the book's pages, written once for every chapter.

A chapter's empirical half depends on the profile that trained its models (a CPU smoke
run or the full GPU run), so its prose must not hard-code a number or a trend.  These
helpers generate that text from the stored results, in a form that renders the same on
the website, in JupyterLab and in Colab:

* :func:`profile_note` — the admonition that opens every results section, saying which
  profile, hardware and test frames produced the outputs below it;
* :func:`say` — a paragraph of Markdown whose numbers come from this run's outputs (the
  cell's input is hidden on the website with the ``remove-input`` tag, so it reads as prose);
* :func:`show` — a figure as PNG (plots) or JPEG (photographs, about ten times smaller), so
  that a chapter stays within its size budget;
* :func:`execute_notebook` — run a chapter in place, as a maintainer does, with the
  execution timestamps stripped so that a re-run diffs cleanly.

The conventions these serve are written down in ``CONTRIBUTING.md``.
"""
from __future__ import annotations

import html
import io
import os
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from .models import cache_dir
from .train import PROFILES, Schedule, check_profile

__all__ = ["HTMLNote", "execute_notebook", "glue", "profile_label", "profile_note", "say", "show", "strip_timings",
           "training_plan"]

TEST_FRAMES = 233  # CamVid's test split
# Measured training time per model, the one figure every chapter's plan quotes: the quick profile
# on the book's 2-core CI machine (see attnlib.train.PROFILES).  The full profile is not yet measured.
SECONDS_PER_MODEL = {"quick": 25}


def training_plan(profile: str, models: str) -> Schedule:
    """Print what a chapter is about to train under ``profile``, and return its schedule.

    ``models`` names them, e.g. ``"two models (FCN, CCNet)"``.  The plan gives the schedule,
    the checkpoint cache that spares retraining, and the time to expect.
    """
    schedule = PROFILES[check_profile(profile)]
    h, w = schedule.crop_size
    print(f"profile {profile!r}: {models}, {schedule.steps:,} steps of {schedule.batch_size} crops of {h}×{w} "
          f"each, unless cached in {cache_dir()}")
    if profile in SECONDS_PER_MODEL:
        print(f"expect about {SECONDS_PER_MODEL[profile]} s per model on an idle 2-core CPU "
              "(measured on the book's CI machine)")
    else:
        print(f"the {profile} profile's time per model has not been measured yet; on a GPU without native "
              "bfloat16 (Colab's T4) it is far slower: consider PROFILE = 'quick'")
    return schedule


def profile_label(profile: str, device: str) -> str:
    """A short label for captions and figure titles, e.g. ``"quick profile, CPU"``."""
    schedule = PROFILES[check_profile(profile)]
    return f"{schedule.name} profile ({schedule.steps} steps), {device}"


def profile_note(profile: str, records: Mapping[str, Mapping]) -> "HTMLNote":
    """The admonition that opens a results section: which runs produced the outputs below.

    ``records`` maps a display name to what :func:`attnlib.models.load_trained` returned
    for it (``record["run"]["device"]``, ``record["metrics"]["images"]``).  For the quick
    profile it says, prominently, that the figures show that the pipeline runs, not what
    the block learns.
    """
    schedule = PROFILES[check_profile(profile)]
    if not records:
        raise ValueError("profile_note: expected at least one trained model's record, got none")
    devices = sorted({r["run"]["device"] for r in records.values()})
    frames = sorted({r["metrics"]["images"] for r in records.values()})
    if len(frames) != 1:
        raise ValueError(f"profile_note: expected every model evaluated on the same frames, got {frames}")
    h, w = schedule.crop_size
    trained = (f"{', '.join(records)}: {schedule.steps:,} steps of {schedule.batch_size} crops of {h}×{w}, "
               f"on {' and '.join(devices)}; test mIoU on {frames[0]} of the {TEST_FRAMES} test frames.")
    if schedule.name == "quick":
        kind, title = "warning", "Quick profile: a smoke run, not a result"
        body = (f"The outputs in this section come from the <strong>quick</strong> profile. {trained} "
                "So short a run shows that the pipeline works end to end; it does not show what the block "
                "learns. Its accuracies, rankings and attention maps are noise: retrained on another CPU, "
                "the ranking of two heads can flip. The text says what to look for and what this run "
                "measured; the full profile (<code>ATTNLIB_PROFILE=full</code>, one GPU) gives the real result.")
    else:
        kind, title = "note", "Full profile"
        body = f"The outputs in this section come from the <strong>full</strong> profile. {trained}"
    return HTMLNote(f'<div class="admonition {kind}"><p class="admonition-title">{html.escape(title)}</p>'
                    f"<p>{body}</p></div>")


class HTMLNote(str):
    """A string of HTML that Jupyter, Colab and the website display as HTML."""

    def _repr_html_(self) -> str:
        return str(self)


class Markdown(str):
    """A string of Markdown that Jupyter, Colab and the website render."""

    def _repr_markdown_(self) -> str:
        return str(self)


def glue(name: str, value: object) -> None:
    """Make ``value`` available to the website's figure captions as ``{glue:text}`name```.

    Captions live in cell metadata, which only the website renders; where myst-nb is not
    installed (Colab) there is nothing to glue for, so this does nothing.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=False)


def say(text: str) -> Markdown:
    """A paragraph of Markdown built from this run's outputs (``$...$`` maths allowed).

    Return it as the cell's last expression; tag the cell ``remove-input`` so the website
    shows the paragraph alone.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"say: expected a non-empty Markdown string, got {text!r}")
    return Markdown(text)


class Picture:
    """An encoded image that Jupyter displays as PNG or JPEG (see :func:`show`)."""

    def __init__(self, data: bytes, fmt: str) -> None:
        self.data, self.format = data, fmt

    def __repr__(self) -> str:  # constant, so that nbval's text comparison ignores the bytes
        return f"<{self.format} figure>"

    def _repr_png_(self) -> bytes | None:
        return self.data if self.format == "png" else None

    def _repr_jpeg_(self) -> bytes | None:
        return self.data if self.format == "jpeg" else None


def show(fig: Figure, *, photo: bool = False, quality: int = 80) -> Picture:
    """Encode ``fig`` once, close it (so the inline backend does not show it again), return it.

    ``photo=True`` stores JPEG at ``quality``: right for photographs with overlays, about a
    tenth of the PNG's size; line plots and diagrams stay PNG, which keeps edges sharp.
    """
    import matplotlib.pyplot as plt

    if not isinstance(fig, Figure):
        raise ValueError(f"show: expected a matplotlib Figure, got {type(fig).__name__}")
    if not 1 <= quality <= 95:
        raise ValueError(f"show: expected a JPEG quality in [1, 95], got {quality}")
    buffer = io.BytesIO()
    if photo:
        fig.savefig(buffer, format="jpeg", dpi=fig.dpi, pil_kwargs={"quality": quality, "optimize": True})
    else:
        fig.savefig(buffer, format="png", dpi=fig.dpi, metadata={"Software": None})
    plt.close(fig)
    return Picture(buffer.getvalue(), "jpeg" if photo else "png")


def strip_timings(notebook: dict) -> dict:
    """Remove the per-cell execution timestamps nbclient records, in place, and return ``notebook``."""
    for cell in notebook.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
    return notebook


def execute_notebook(path: str | os.PathLike, *, timeout: int = 1800, kernel: str = "python3") -> Path:
    """Execute a chapter in place (from its own folder, as Jupyter does) and save it without timestamps.

    The profile is the one :func:`attnlib.train.profile` picks in the kernel
    (``$ATTNLIB_PROFILE`` overrides).  Needs ``nbclient`` and ``nbformat`` (installed with
    the book's requirements).
    """
    import nbclient
    import nbformat

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name=kernel, record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nbformat.write(strip_timings(notebook), path)
    return path
