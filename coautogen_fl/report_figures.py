"""The pictures of a run report (coautogen_fl/report.py), each returned as a ``data:`` URI so
the HTML file carries them inside itself and opens offline.

Image strips are composed with PIL from the stored PNG files; plots are drawn with matplotlib's
object API on an Agg canvas (no pyplot: no global figure state, no display needed).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Thumbnails in a strip are at most this many pixels on a side (larger images are shrunk).
THUMB_PX = 48
#: Pixels between the thumbnails of a strip.
GAP_PX = 1


def data_uri(payload: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``payload``."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def evenly_spaced(count: int, limit: int) -> list[int]:
    """At most ``limit`` indices of ``range(count)``, evenly spread, the first and last included."""
    if count <= limit:
        return list(range(count))
    if limit <= 1:
        return [0][:limit]
    return sorted({int(round(i * (count - 1) / (limit - 1))) for i in range(limit)})


def _thumbnail(path: Path) -> Image.Image | None:
    """The image at ``path`` shrunk to THUMB_PX (aspect kept), or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            thumb = image.convert("RGB" if image.mode not in ("L", "1", "I;16", "I", "F") else "L")
    except (OSError, ValueError):
        return None
    if max(thumb.size) > THUMB_PX:
        thumb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    return thumb


def image_strip(paths: Sequence[Path]) -> tuple[str, int, int] | None:
    """One row of thumbnails of the images at ``paths`` (unreadable ones left out).

    Returns
    -------
    (uri, width, height) or None
        A PNG data URI for grayscale images, JPEG (quality 85) once any is in colour, where PNG
        would be several times larger; its pixel size; None when no image could be read.
    """
    thumbs = [t for t in (_thumbnail(p) for p in paths) if t is not None]
    if not thumbs:
        return None
    colour = any(t.mode == "RGB" for t in thumbs)
    mode = "RGB" if colour else "L"
    height = max(t.size[1] for t in thumbs)
    width = sum(t.size[0] for t in thumbs) + GAP_PX * (len(thumbs) - 1)
    strip = Image.new(mode, (width, height), color=(255, 255, 255) if colour else 255)
    x = 0
    for thumb in thumbs:
        strip.paste(thumb.convert(mode), (x, 0))
        x += thumb.size[0] + GAP_PX
    buffer = io.BytesIO()
    if colour:
        strip.save(buffer, format="JPEG", quality=85)
        return data_uri(buffer.getvalue(), "image/jpeg"), width, height
    strip.save(buffer, format="PNG", optimize=True)
    return data_uri(buffer.getvalue(), "image/png"), width, height


def _figure(width_in: float, height_in: float):  # -> (Figure, Axes)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=90, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return data_uri(buffer.getvalue(), "image/png")


def vote_histogram(votes: Sequence[float], noise_std: float | None, title: str) -> str:
    """Histogram of one round's summed noised votes per candidate, with +-1 noise std marked:
    the votes outside that band carry signal, the rest is mostly the sites' DP noise."""
    figure, ax = _figure(4.6, 2.4)
    values = np.asarray(votes, dtype=np.float64)
    ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#4c72b0", edgecolor="white", linewidth=0.4)
    if noise_std:
        for x in (-noise_std, noise_std):
            ax.axvline(x, color="#c44e52", linestyle="--", linewidth=1)
        title += f"\ndashed: ±1 aggregate noise std ({noise_std:.3g})"
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("summed noised votes per candidate", fontsize=8)
    ax.set_ylabel("candidates", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(figure)


def spend_curve(
    spends: Mapping[str, Sequence[float | None]],
    steps: Sequence[str],
    budget: float | None,
    dpsgd_from: int | None = None,
) -> str:
    """Epsilon spent by every site after each step (the rounds, then the run's end, which adds the
    noised evaluation), against the run's budget. More than 12 sites are drawn as the range (min to
    max) and the median, so the picture stays readable. ``dpsgd_from``: the index of the first
    DP-SGD round (``-tt real`` / ``mix``), marked with a dotted line."""
    figure, ax = _figure(6.0, 2.8)
    x = np.arange(len(steps))
    rows = np.array([[np.nan if v is None else v for v in values] for values in spends.values()], dtype=np.float64)
    if len(rows) and np.allclose(rows, rows[0], equal_nan=True):  # the usual case: every site spent the same
        ax.plot(x, rows[0], marker="o", markersize=4, linewidth=1.5, label=f"every site ({len(rows)})")
    elif len(rows) <= 12:
        for name, row in zip(spends, rows):
            ax.plot(x, row, marker="o", markersize=3, linewidth=1, label=f"site {name}")
    else:
        with np.errstate(all="ignore"):  # a step no site reached is all-NaN: nothing to draw there
            ax.fill_between(x, np.nanmin(rows, 0), np.nanmax(rows, 0), color="#4c72b0", alpha=0.25, label="min to max")
            ax.plot(
                x,
                np.nanmedian(rows, 0),
                marker="o",
                markersize=3,
                color="#4c72b0",
                label=f"median of {len(rows)} sites",
            )
    if budget is not None:
        ax.axhline(budget, color="#c44e52", linestyle="--", linewidth=1, label=f"run budget {budget:g}")
    if dpsgd_from is not None:
        ax.axvline(dpsgd_from - 0.5, color="#555555", linestyle=":", linewidth=1, label="DP-SGD rounds from here")
    top = np.nanmax(np.append(rows.ravel(), budget if budget is not None else 0.0)) if rows.size else (budget or 1.0)
    ax.set_ylim(0, 1.15 * top if np.isfinite(top) and top > 0 else 1.0)
    ax.legend(fontsize=6, ncol=2 if len(rows) > 6 else 1, loc="lower right")
    ticks = sorted(set(x[:: max(1, len(x) // 15)]) | {len(x) - 1})  # at most ~15 labels, the last always
    ax.set_xticks(ticks, [steps[i] for i in ticks])
    ax.set_xlabel("after round (end: after the run, with the evaluation if it is noised)", fontsize=8)
    ax.set_ylabel("epsilon spent", fontsize=8)
    ax.set_title("privacy spend per site", fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(figure)


def accuracy_bars(accuracies: Mapping[str, float]) -> str:
    """The downstream model's final accuracies (e.g. central real test split, federated), 0..1."""
    figure, ax = _figure(4.6, 2.2)
    names, values = list(accuracies), [float(v) for v in accuracies.values()]
    bars = ax.barh(names, values, color="#55a868")
    for bar, value in zip(bars, values):
        ax.text(min(value, 0.9) + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy of the downstream model", fontsize=8)
    ax.set_title("final accuracies", fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(figure)


def accuracy_curve(rounds: Sequence[int], accuracies: Sequence[float]) -> str:
    """The global model's accuracy on the central real test split after each round that measured
    it (the DP-SGD rounds of ``-tt real`` / ``mix``)."""
    figure, ax = _figure(4.6, 2.4)
    ax.plot(list(rounds), list(accuracies), marker="o", markersize=3, color="#55a868")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round", fontsize=8)
    ax.set_ylabel("accuracy, central test", fontsize=8)
    ax.set_title("accuracy per round", fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(figure)
