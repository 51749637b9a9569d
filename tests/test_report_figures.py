"""Every report and explanation figure is readable at the report's width (issue 27): drawn in matplotlib, no two
text boxes overlap, every text lies inside the figure, data labels stay inside their axes, legends hide no data,
trial axes have integer ticks. Tiny synthetic inputs; no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import combinations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from dogbench.report import plots

TOLERANCE_PX = 0.5  # boxes that share an edge do not collide


@contextmanager
def drawn_texts() -> Iterator[list[tuple[Text, Bbox]]]:
    """Every text matplotlib actually draws while the block runs, with its box in pixels (words only)."""
    seen: list[tuple[Text, Bbox]] = []
    draw = Text.draw

    def recording(self: Text, renderer) -> None:  # noqa: ANN001 - matplotlib's renderer
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            if isinstance(self, Annotation):
                self.update_positions(renderer)
            seen.append((self, Text.get_window_extent(self, renderer)))

    Text.draw = recording
    try:
        yield seen
    finally:
        Text.draw = draw


def _overlap(a: Bbox, b: Bbox) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > TOLERANCE_PX) and (min(a.y1, b.y1) - max(a.y0, b.y0) > TOLERANCE_PX)


def check_layout(fig: Figure) -> list[str]:
    """What a reader could not read in ``fig``: colliding texts, texts outside the figure, data labels crossing
    their axes, legends over the data."""
    with drawn_texts() as texts:
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    problems = [f"{t.get_text()!r} outside the figure {box} not in {page}" for t, box in texts
                if box.x0 < page.x0 - 1 or box.y0 < page.y0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1]
    for (t1, b1), (t2, b2) in combinations(texts, 2):
        if _overlap(b1, b2):
            problems.append(f"{t1.get_text()!r} overlaps {t2.get_text()!r}")
    for t, box in texts:
        if isinstance(t, Annotation) and t.axes is not None:
            frame = t.axes.get_window_extent(renderer)
            if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
                problems.append(f"label {t.get_text()!r} crosses its axes' border")
    legends = [c for c in fig.get_children() if isinstance(c, Legend)] + [ax.get_legend() for ax in fig.axes]
    for legend in filter(None, legends):
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>" and _overlap(box, ax.get_window_extent(renderer)):
                problems.append("a legend lies over the data")
    return problems


COLOURS = plots.palette(["cnn", "vit", "cnn/lora"])
RNG = np.random.default_rng(0)
BREEDS = [f"breed number {i} of the long-named kind" if i % 7 == 0 else f"breed {i}" for i in range(120)]


def _points() -> list[plots.ModelPoint]:
    return [plots.ModelPoint("cnn", 0.817, (0.801, 0.831), 0.77, 121.4, 0.816, (0.801, 0.831)),
            plots.ModelPoint("vit", 0.480, (0.460, 0.501), 11.0, 640.0, 0.466, (0.447, 0.487)),
            plots.ModelPoint("cnn/lora", 0.83, (0.81, 0.85), 0.77, 130.0)]


def _recalls() -> tuple[np.ndarray, np.ndarray]:
    a = np.round(RNG.uniform(0.4, 1.0, 120) * 20) / 20  # 20 images a breed: many breeds share a point
    b = np.clip(a - np.round(RNG.uniform(-0.1, 0.6, 120) * 20) / 20, 0, 1)
    return a, b


def _confusion(n: int) -> np.ndarray:
    c = RNG.poisson(0.15, (n, n)) + np.eye(n, dtype=int) * 15
    return c


def _trials(n: int) -> tuple:
    states = ["COMPLETE" if i % 3 else "PRUNED" for i in range(n)]
    heads = [("linear", "logistic", "mlp")[(i // 3) % 3] for i in range(n)]
    return np.arange(n), RNG.uniform(0.05, 0.46, n), states, heads, "vit"


def _reliability() -> tuple:
    edges = list(np.linspace(0, 1, 16))
    bins = {"edges": edges, "accuracy": [None, *RNG.uniform(0, 1, 14)]}
    return bins, {"edges": edges, "accuracy": [None, *RNG.uniform(0, 1, 14)]}, "vit", 1.43


def _curves() -> dict:
    def point(m: float) -> dict:
        return {"mean": m, "min": m - 0.02, "max": m + 0.02, "std": 0.01, "runs": [m]}
    return {k: {str(s): {"tuned": point(0.2 + 0.1 * i + j), "baseline": point(0.15 + 0.1 * i + j)}
                for i, s in enumerate((1, 2, 5, 10))} for j, k in ((0.0, "cnn"), (0.2, "vit"))}


def _panels(n_models: int) -> list:
    photo = (RNG.uniform(0, 255, (300, 400, 3))).astype(np.uint8)
    overlay = (RNG.uniform(0, 255, (224, 224, 3))).astype(np.uint8)
    top = [("Sussex spaniel", 0.80), ("an extraordinarily long breed name of a dog", 0.18), ("Gordon setter", 0.01)]
    return [("photo", photo, ())] + [(f"vit: saliency-tuned DINOv2 ViT-S/14 number {i}, attention rollout", overlay,
                                      top) for i in range(n_models)]


FIGURES: dict[str, Callable[[], Figure]] = {
    "accuracy_intervals": lambda: plots.accuracy_intervals(_points(), COLOURS),
    "accuracy_vs_compute": lambda: plots.accuracy_vs_compute(_points(), COLOURS),
    "ladder": lambda: plots.ladder({
        "cnn": [("frozen", 0.817, (0.80, 0.83), 120.0), ("lora", 0.83, (0.81, 0.85), 900.0),
                ("full", 0.84, (0.82, 0.86), 3000.0)],
        "vit": [("frozen", 0.48, (0.46, 0.50), 640.0), ("lora", 0.49, (0.47, 0.51), 950.0)]}),
    "per_breed_scatter": lambda: plots.per_breed_scatter(BREEDS, *_recalls(), "cnn", "vit", COLOURS),
    "breed_differences": lambda: plots.breed_differences(BREEDS, *_recalls(), "cnn", "vit", COLOURS),
    "confusion_figure": lambda: plots.confusion_figure(BREEDS, _confusion(120), "cnn"),
    "confusion_figure_fitted": lambda: plots.confusion_figure(BREEDS, _confusion(120), "cnn", fitted=True),
    "confusion_figure_small": lambda: plots.confusion_figure(BREEDS[:5], _confusion(5), "cnn"),
    "optimisation_history": lambda: plots.optimisation_history(*_trials(20)),
    "parameter_importance": lambda: plots.parameter_importance({"head": 0.91, "lr": 0.05, "weight_decay": 0.04},
                                                               "vit", 12),
    "reliability_diagram": lambda: plots.reliability_diagram(*_reliability()),
    "data_efficiency": lambda: plots.data_efficiency(_curves(), COLOURS),
    "explanation_figure": lambda: plots.explanation_figure(_panels(2)),
    "explanation_figure_many": lambda: plots.explanation_figure(_panels(4)),
}


def test_every_figure_function_is_covered() -> None:
    public = {name for name in plots.__dict__ if callable(getattr(plots, name)) and not name.startswith("_")
              and getattr(getattr(plots, name), "__module__", "") == plots.__name__ and name[0].islower()}
    helpers = {"palette", "new_figure", "png", "breed_order"}
    assert public - helpers <= {k.split("_small")[0].split("_fitted")[0].split("_many")[0] for k in FIGURES}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_no_text_of_a_figure_collides_or_is_cut(name: str) -> None:
    assert check_layout(FIGURES[name]()) == []


def test_the_checker_finds_what_the_issue_saw() -> None:
    """A label crossing the border, two labels on one spot and a legend over the data are all caught."""
    fig = plots.new_figure(4, 3)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="a line")
    ax.annotate("81.7%", (0.98, 0.5), xytext=(6, 0), textcoords="offset points")
    ax.annotate("Scotch terrier", (0.3, 0.3))
    ax.annotate("Saluki", (0.3, 0.3))
    ax.legend(loc="lower right")
    problems = check_layout(fig)
    assert any("'81.7%' crosses" in p for p in problems)
    assert any("'Scotch terrier' overlaps 'Saluki'" in p for p in problems)
    assert "a legend lies over the data" in problems


def test_trials_are_counted_in_whole_numbers_and_the_legend_names_every_kind() -> None:
    fig = plots.optimisation_history(*_trials(20))
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 3 and np.all(ticks == np.round(ticks))
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(names) == {f"{h} ({s})" for h in ("linear", "logistic", "mlp") for s in ("complete", "pruned")} | {
        "best so far"}


def test_labels_that_find_no_room_are_left_out_not_stacked() -> None:
    from dogbench.report.labels import place_labels

    fig = plots.new_figure(2, 2)
    ax = fig.add_subplot()
    ax.set(xlim=(0, 1), ylim=(0, 1))
    left_out = place_labels(ax, np.full((40, 2), 0.5), [f"a long breed name {i}" for i in range(40)])
    assert 0 < len(left_out) < 40
    assert check_layout(fig) == []


def test_explanation_figures_carry_a_colour_scale_with_its_reading_guide() -> None:
    fig = plots.explanation_figure(_panels(2))
    fig.canvas.draw()
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    assert [t.get_text() for t in bars[0].get_xticklabels()] == ["low", "high"]
    assert bars[0].get_xlabel().replace("\n", " ") == plots.READING_GUIDE
