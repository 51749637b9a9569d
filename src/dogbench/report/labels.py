"""Text labels on a plot that neither collide nor cross the axes: a deterministic greedy placement.

Each label tries offsets around its point, nearest first, and takes the first whose box stays inside the axes and
clear of the labels already placed; a label with no free place is left out (the caller's table names it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.text import Text
from matplotlib.transforms import Bbox

# offsets in points, nearest ring first; within a ring: right, left, up, down, then the diagonals
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
_RINGS = (5, 12, 22, 34, 48)
PAD_PX = 2.0  # clearance between two labels and from the axes' frame


def _fits(box: Bbox, frame: Bbox, taken: Sequence[Bbox]) -> bool:
    inner = Bbox.from_extents(frame.x0 + PAD_PX, frame.y0 + PAD_PX, frame.x1 - PAD_PX, frame.y1 - PAD_PX)
    if not (inner.x0 <= box.x0 and box.x1 <= inner.x1 and inner.y0 <= box.y0 and box.y1 <= inner.y1):
        return False
    grown = box.expanded(1.0, 1.0).padded(PAD_PX)
    return not any(grown.overlaps(other) for other in taken)


def place_labels(ax: Axes, xy: np.ndarray, texts: Sequence[str], *, fontsize: float = 7.5) -> list[str]:
    """Annotate the points ``xy`` (data coordinates, (n, 2)) with ``texts`` in the given priority order; returns
    the texts that found no free place. Call after the axes' limits and the figure's layout are final."""
    fig = ax.figure
    fig.canvas.draw()  # the layout (constrained) and the transforms as they will be saved
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    left_out = []
    for (x, y), text in zip(np.asarray(xy, dtype=float), texts, strict=True):
        for ring in _RINGS:
            placed = None
            for dx, dy in _DIRECTIONS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                label = ax.annotate(text, (x, y), xytext=(dx * ring, dy * ring), textcoords="offset points",
                                    ha=ha, va=va, fontsize=fontsize,
                                    arrowprops={"arrowstyle": "-", "color": "#777777", "lw": 0.6}
                                    if ring > _RINGS[0] else None)
                label.update_positions(renderer)
                box = Text.get_window_extent(label, renderer)  # the words, not the leader line
                if _fits(box, frame, taken):
                    placed = box
                    break
                label.remove()
            if placed is not None:
                taken.append(placed)
                break
        else:
            left_out.append(text)
    return left_out


__all__ = ["PAD_PX", "place_labels"]
