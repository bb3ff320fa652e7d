"""One self-contained HTML report of a CST integrity run, and the group page (research use).

Plain functions, no Nipype.  A page is rendered from a context of plain values
(:mod:`.context`, :mod:`.context_qc`), the words of its figures in ``report.toml``
and Jinja2 templates (``templates/``: ``base.html.j2`` shared by the subject and group
pages); its figures are drawn with matplotlib's Agg canvas, on ``n_jobs`` processes
(:mod:`.drawing`), and embedded as PNG data URIs.  The CSS is inline; the page needs
no JavaScript, no network and no external font.

Modules
-------
context, context_qc   the subject page's values, read from the run's files
prose                 the verdict in words and the Methods paragraph
figures_anatomy       CST on FA slices, colour FA, glass brain
figures_profiles      FA, asymmetry and diffusivity profiles
figures_qc            brain mask, ROIs, registration, motion, gradient check
slicing               world-space slicing and projection, panel layout
drawing               canvas, colours, figure specs drawn on n_jobs processes
inputs, values        loading inputs; reading and formatting metric values
render                Jinja2 environment, pages, :func:`write_report`
"""

from .drawing import COLORS, FigureSpec, draw_figures, figure_slot, figure_to_data_uri, new_figure
from .figures_anatomy import (
    GLASS_PANELS,
    plot_color_fa,
    plot_glass_brain,
    plot_tract_slices,
    world_abs_directions,
)
from .figures_profiles import plot_asymmetry_profile, plot_diffusivity_profiles, plot_profiles
from .figures_qc import (
    plot_gradient_check,
    plot_mask_overlay,
    plot_motion,
    plot_registration,
    plot_roi_overlay,
)
from .prose import methods_text, verdict
from .render import build_report_html, render_page, write_report
from .slicing import project_points, sample_world_slice

__all__ = [
    "COLORS", "GLASS_PANELS", "FigureSpec", "build_report_html", "draw_figures",
    "figure_slot", "figure_to_data_uri", "methods_text", "new_figure", "plot_asymmetry_profile",
    "plot_color_fa", "plot_diffusivity_profiles", "plot_glass_brain", "plot_gradient_check",
    "plot_mask_overlay", "plot_motion", "plot_profiles", "plot_registration",
    "plot_roi_overlay", "plot_tract_slices", "project_points", "render_page",
    "sample_world_slice", "verdict", "world_abs_directions", "write_report",
]
