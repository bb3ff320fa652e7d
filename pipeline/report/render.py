"""Rendering the report pages: figures drawn, words from ``report.toml``, Jinja2 templates.

A page is rendered in three steps: its context names each figure by a slot
(:func:`~pipeline.report.drawing.figure_slot`); every figure is drawn
(:func:`~pipeline.report.drawing.draw_figures`, on ``n_jobs`` processes) and gets its
caption and alternative text from ``report.toml``; the template lays the page out.
The page is self-contained: CSS inline, figures as data URIs, no script.
"""

import tomllib
from functools import cache
from importlib import resources
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ..io.outputs import write_text
from .context import subject_context
from .drawing import draw_figures
from .values import fmt_value


@cache
def report_spec() -> dict:
    """The figures' titles, captions and alternative texts and the pages' sections
    (``report.toml``)."""
    return tomllib.loads(resources.files(__package__).joinpath("report.toml").read_text("utf-8"))


@cache
def environment() -> Environment:
    """The Jinja2 environment of the report templates; every value is escaped unless it
    is :class:`~markupsafe.Markup` (the Methods paragraph, the captions)."""
    env = Environment(loader=PackageLoader(__package__, "templates"),
                      autoescape=select_autoescape(("j2",), default_for_string=True),
                      undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["fmt_value"] = fmt_value
    return env


def _words(key, values) -> tuple[Markup, Markup]:
    """The alternative text and caption of figure ``key``, its ``values`` filled in (and
    escaped)."""
    words = report_spec()["figures"][key]
    env = environment()
    return (Markup(env.from_string(words["alt"]).render(values)),
            Markup(env.from_string(words["caption"]).render(values)))


def draw_slots(slots, *, n_jobs=1) -> dict:
    """Draw the figure of each slot; for each key, the ``uri``, ``alt`` and ``caption``
    of the figure, or the ``placeholder`` message shown instead."""
    to_draw = [key for key, slot in slots.items() if slot["spec"] is not None]
    drawn = dict(zip(to_draw, draw_figures([slots[k]["spec"] for k in to_draw], n_jobs=n_jobs)))
    figures = {}
    for key, slot in slots.items():
        if slot["missing"]:
            figures[key] = {"uri": None, "placeholder": slot["missing"]}
            continue
        alt, caption = _words(slot["words"] or key, slot["values"])
        if drawn[key].uri is None:
            figures[key] = {"uri": None, "placeholder":
                            f"{alt}: figure could not be drawn ({drawn[key].error})."}
        else:
            figures[key] = {"uri": drawn[key].uri, "alt": alt, "caption": caption}
    return figures


def render_page(template, context, *, n_jobs=1) -> str:
    """The HTML page of ``template`` (in ``templates/``) for ``context``.

    ``context["figures"]`` maps each figure's key in ``report.toml`` to its slot; the
    figures are drawn on ``n_jobs`` processes (the page is the same for any value).
    """
    figures = draw_slots(context.get("figures", {}), n_jobs=n_jobs)
    return environment().get_template(template).render(
        {**context, "figures": figures, "spec": report_spec()})


def build_report_html(*, metrics, profiles_tsv, fa_file, tract_files, mask_file=None,
                      rois_file=None, v1_file=None, template_in_subject_file=None,
                      n_jobs=1) -> str:
    """The subject's report as an HTML string (see :func:`write_report`)."""
    context = subject_context(metrics=metrics, profiles_tsv=profiles_tsv, fa_file=fa_file,
                              tract_files=tract_files, mask_file=mask_file,
                              rois_file=rois_file, v1_file=v1_file,
                              template_in_subject_file=template_in_subject_file)
    return render_page("subject.html.j2", context, n_jobs=n_jobs)


def write_report(out_html, *, metrics: dict, profiles_tsv, fa_file, tract_files: dict,
                 mask_file=None, rois_file=None, v1_file=None,
                 template_in_subject_file=None, n_jobs=1) -> Path:
    """Write the self-contained HTML report, atomically; return its path.

    Parameters
    ----------
    out_html : path of the HTML file to write (its folder is created)
    metrics : the metrics dict (``pipeline.steps.assess``); any key may be missing
    profiles_tsv : path of the profiles TSV (``tract, node, fa, md, rd, ad, x, y, z, level``)
    fa_file : subject FA NIfTI, any storage orientation
    tract_files : {"left": path, "right": path} of tractograms (world RAS mm)
    mask_file, rois_file : optional brain mask and CST ROI label NIfTIs (subject space)
    v1_file : optional principal eigenvector, 4D X×Y×Z×3 in the voxel-axis frame (DIPY's
        ``evecs[..., 0]``); gives the colour-FA figure (skipped with a note if None)
    template_in_subject_file : optional template brain mask or template FA resampled on
        the subject grid (warped by the registration); gives the registration figure
        (skipped with a note if None)
    n_jobs : processes drawing the figures (:func:`~pipeline.report.drawing.draw_figures`;
        same page for any value)

    Any input may be None, missing or empty: the report still renders and says so.
    """
    text = build_report_html(metrics=metrics, profiles_tsv=profiles_tsv, fa_file=fa_file,
                             tract_files=tract_files, mask_file=mask_file, rois_file=rois_file,
                             v1_file=v1_file, template_in_subject_file=template_in_subject_file,
                             n_jobs=n_jobs)
    return write_text(out_html, text)
