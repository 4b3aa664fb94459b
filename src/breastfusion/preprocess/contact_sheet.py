"""A contact sheet: before / after preprocessing pairs in one PNG, for a person to check by eye.

Each item is drawn as two panels, the original file (grey, as read) on the
left (in colour for a colour file) and the preprocessed model input on the right, titled with the file
name and what the crop did (kept size, flips, flags such as ``fallback``,
``laterality_mismatch``, ``colour_greyed``). On the original, the crop box is
outlined. A file that cannot be read or is refused (a colour image under the
``reject`` policy) shows the reason instead of the preprocessed panel; the
sheet is still written. Matplotlib's Agg canvas is used directly, so no
display and no global backend switch are needed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BreastFusionError
from ..files import atomic_path
from ..vocab import Modality, Side
from .images import read_grey
from .pipeline import Preprocessor, read_rgb

Item = tuple[str, Modality | str, Side | str | None]


def contact_sheet(items: Sequence[Item], preprocessor: Preprocessor, out_png: str | os.PathLike,
                  columns: int = 4, panel_inches: float = 2.2, dpi: int = 100) -> Path:
    """Write before/after pairs for `items` (path, modality, side) as one PNG; return its path.

    `columns` is the number of pairs per row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    items = list(items)
    if not items:
        raise ValueError("contact_sheet needs at least one item")
    columns = max(1, min(int(columns), len(items)))
    rows = -(-len(items) // columns)
    fig = Figure(figsize=(2 * columns * panel_inches, rows * (panel_inches + 0.45)), dpi=dpi)
    FigureCanvasAgg(fig)
    for index, (path, modality, side) in enumerate(items):
        row, col = divmod(index, columns)
        before = fig.add_subplot(rows, 2 * columns, row * 2 * columns + 2 * col + 1)
        after = fig.add_subplot(rows, 2 * columns, row * 2 * columns + 2 * col + 2)
        for ax in (before, after):
            ax.set_xticks([])
            ax.set_yticks([])
        name = Path(path).name
        side_text = Side.parse(side).value if side not in (None, "") else "?"
        try:
            colour = read_rgb(path)  # a colour file is shown in colour
            original = colour if colour is not None else read_grey(str(path))
            before.imshow(original, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        except BreastFusionError as exc:
            before.text(0.5, 0.5, _wrap(str(exc)), ha="center", va="center", fontsize=6,
                        transform=before.transAxes)
        before.set_title(_wrap(f"{name} [{Modality.parse(modality).value} {side_text}]"), fontsize=7)
        try:
            processed, info = preprocessor.process_info(path, modality, side)
        except BreastFusionError as exc:
            after.text(0.5, 0.5, _wrap(str(exc).replace(str(path), name), lines=6), ha="center", va="center",
                       fontsize=6, color="darkred", transform=after.transAxes)
            after.set_title("refused", fontsize=7, color="darkred")
            continue
        top, left, bottom, right = info.bbox
        before.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   edgecolor="yellow" if not info.fallback else "red", linewidth=1))
        after.imshow(processed, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        alarm = info.fallback or any(f in info.flags for f in ("laterality_mismatch", "colour_greyed"))
        after.set_title(_wrap(info.describe() + (f" ({info.reason})" if info.reason else "")), fontsize=7,
                        color="darkred" if alarm else "black")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def _wrap(text: str, width: int = 38, lines: int = 3) -> str:
    return "\n".join(textwrap.wrap(text, width)[:lines]) or " "


def sample_images(paths: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """A reproducible sample of `n` paths (all when fewer), in the input order."""
    paths = list(paths)
    if n >= len(paths):
        return paths
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(paths), size=n, replace=False))
    return [paths[i] for i in keep]
