"""The matplotlib canvas of the report's figures and their colours.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend
state is touched, and embedded as base64 PNG data URIs: the page needs no other file.
"""

import base64
import io
import logging
import multiprocessing
import sys
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOGGER = logging.getLogger(__name__)

#: Tract colours (Okabe-Ito, colour-blind safe); both stand out from a grey FA map.
COLORS = {"left": "#E69F00", "right": "#0072B2"}
#: The asymmetry peak and the detected segments.
PEAK_COLOR = "#D7191C"
SEGMENT_COLOR = "#D7191C"
#: Background band and short label of each level of the neuraxis in the profile figures.
LEVEL_COLORS = {"medulla": "#c6dbef", "pons": "#c7e9c0", "cerebral_peduncle": "#fdd0a2",
                "internal_capsule": "#dadaeb", "corona_radiata": "#fff2ae",
                "cortex": "#d9d9d9"}
LEVEL_SHORT = {"medulla": "medulla", "pons": "pons", "cerebral_peduncle": "peduncle",
               "internal_capsule": "int. capsule", "corona_radiata": "corona rad.",
               "cortex": "cortex"}
#: Labels of the CST ROI image (atlases/).
ROI_LABELS = {1: "motor_L", 2: "motor_R", 3: "plic_L", 4: "plic_R", 5: "peduncle_L",
              6: "peduncle_R", 7: "pons_L", 8: "pons_R"}

#: Resolution of every figure of the reports (dots per inch).
DPI = 110


def new_figure(width, height) -> Figure:
    """An empty ``width`` × ``height`` inch figure on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_to_data_uri(fig, *, dpi=DPI) -> str:
    """Render a matplotlib Figure (Agg) to a ``data:image/png;base64,…`` URI."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor(),
                bbox_inches="tight", pad_inches=0.08)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class FigureSpec:
    """A figure to draw: ``plot(**kwargs)`` returns the matplotlib Figure.

    ``plot`` is a module-level function and ``kwargs`` plain values, images and
    streamlines, so that a spec can be sent to another process (:func:`draw_figures`).
    """

    plot: Any
    kwargs: dict = field(default_factory=dict)


def figure_slot(plot=None, *, kwargs=None, missing=None, words=None, **values) -> dict:
    """A place for a figure on a page: ``plot(**kwargs)``, drawn later, or the reason there
    is no figure (``missing``, shown in its place).

    ``values`` are what the figure's caption and alternative text fill in: those of
    ``[figures.KEY]`` in ``report.toml``, KEY being ``words`` or else the slot's key.
    """
    spec = None if missing else FigureSpec(plot, kwargs or {})
    return {"spec": spec, "missing": missing or None, "words": words, "values": values}


@dataclass(frozen=True)
class DrawnFigure:
    """The PNG data URI of a drawn figure, or why it could not be drawn."""

    uri: str | None = None
    error: str | None = None


def draw_figure(spec) -> DrawnFigure:
    """Draw one :class:`FigureSpec`; a failure is returned, not raised, so that one bad
    figure does not sink the report."""
    try:
        return DrawnFigure(uri=figure_to_data_uri(spec.plot(**spec.kwargs)))
    except Exception as exc:  # noqa: BLE001 - reported in the figure's place
        LOGGER.exception("report figure %s failed", getattr(spec.plot, "__name__", spec.plot))
        return DrawnFigure(error=f"{type(exc).__name__}: {exc}")


def _draw_in_worker(spec) -> DrawnFigure:
    # Looked up at call time, so that the forked workers draw with the same function as
    # the parent (tests record which process drew each figure by replacing it).
    return draw_figure(spec)


def draw_figures(specs, *, n_jobs=1) -> list[DrawnFigure]:
    """Draw each :class:`FigureSpec`, in order.

    Each figure is independent and costs 0.1–0.8 s of single-threaded matplotlib, so
    with ``n_jobs`` ≥ 2 they are drawn in that many forked processes (Linux; serially
    elsewhere, and in a daemonic process, which may not have children). The figures,
    and so the page, are the same either way.
    """
    specs = list(specs)
    n_workers = min(n_jobs, len(specs))
    if n_workers < 2 or sys.platform != "linux" or multiprocessing.current_process().daemon:
        return [draw_figure(spec) for spec in specs]
    with multiprocessing.get_context("fork").Pool(n_workers) as pool:
        return pool.map(_draw_in_worker, specs, chunksize=1)
