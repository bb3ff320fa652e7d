"""Group level: one tidy row per subject/run, normative profiles from the controls, and
every other run compared with them (tables, per-run files, one HTML page)."""

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..cst import TRACT_NAMES
from ..io.outputs import file_sha256, provenance, write_json, write_sidecar, write_text
from ..report import figure_slot, new_figure, render_page
from . import normative

GROUP_COLUMNS = ("participant_id", "run", "assessable", "umn_damage", "affected_side", "level",
                 "peak_x", "peak_y", "peak_z", "fa_ai_tract", "fa_ai_plic",
                 "n_streamlines_left", "n_streamlines_right", "fa_mean_left", "fa_mean_right",
                 "md_mean_left", "md_mean_right", "prognosis_category",
                 # against the controls' norms (n/a for controls and without norms)
                 "control", "normative_umn_damage", "normative_affected_side",
                 "normative_level", "normative_peak_node", "normative_peak_t")
#: Columns that are findings or measurements of the CST: empty (n/a) for a run whose CST
#: QC found not assessable, so that no table reader takes them for a normal result.
#: The streamline counts stay: they are part of why a run failed.
NOT_ASSESSABLE_EMPTY = ("umn_damage", "affected_side", "level", "peak_x", "peak_y", "peak_z",
                        "fa_ai_tract", "fa_ai_plic", "fa_mean_left", "fa_mean_right",
                        "md_mean_left", "md_mean_right")
NORMS_NAME = "group_desc-norms_tractometry.tsv"
METRICS_SUFFIX = "_desc-cst_metrics.json"


def _runs(out_dir):
    """(metrics path, metrics dict) of every run under ``out_dir``, sorted by path."""
    return [(path, json.loads(path.read_text()))
            for path in sorted(Path(out_dir).glob(f"sub-*/**/*{METRICS_SUFFIX}"))]


def _profiles_path(metrics_path):
    stem = metrics_path.name[: -len(METRICS_SUFFIX)]
    return metrics_path.with_name(f"{stem}_desc-profiles_tractometry.tsv")


def group_rows(out_dir, controls=frozenset(), comparisons=None):
    """Rows of the group table, from every ``*_desc-cst_metrics.json`` under ``out_dir``.

    ``controls``: labels of the control participants; ``comparisons``: run stem ->
    :func:`pipeline.tractometry.normative.compare_with_norms` result, for the normative columns.
    A run that is not assessable has None (n/a) in :data:`NOT_ASSESSABLE_EMPTY`.
    """
    comparisons = comparisons or {}
    rows = []
    for path, m in _runs(out_dir):
        loc, cst = m["localization"], m["cst"]
        peak = loc.get("peak_ras_mm") or [None, None, None]
        stem = path.name[: -len(METRICS_SUFFIX)]
        normed = (comparisons.get(stem) or {}).get("localization") or {}
        primary = next((s for s in normed.get("segments", [])
                        if s["peak_node"] == normed.get("peak_node")), {})
        rows.append({
            "participant_id": f"sub-{m['subject']}",
            "run": stem,
            "assessable": m["qc"]["assessable"], "umn_damage": loc["umn_damage"],
            "affected_side": loc["affected_side"], "level": loc["level"],
            "peak_x": peak[0], "peak_y": peak[1], "peak_z": peak[2],
            "fa_ai_tract": m["asymmetry"]["fa_ai_tract"],
            "fa_ai_plic": m["asymmetry"]["fa_ai_plic"],
            "n_streamlines_left": cst["left"]["n_streamlines"],
            "n_streamlines_right": cst["right"]["n_streamlines"],
            "fa_mean_left": cst["left"]["fa_mean"], "fa_mean_right": cst["right"]["fa_mean"],
            "md_mean_left": cst["left"]["md_mean"], "md_mean_right": cst["right"]["md_mean"],
            "prognosis_category": m["prognosis"]["category"],
            "control": m["subject"] in controls,
            "normative_umn_damage": normed.get("umn_damage"),
            "normative_affected_side": normed.get("affected_side"),
            "normative_level": normed.get("level"),
            "normative_peak_node": normed.get("peak_node"),
            "normative_peak_t": primary.get("peak_t"),
        })
        if not m["qc"]["assessable"]:
            rows[-1].update(dict.fromkeys(NOT_ASSESSABLE_EMPTY))
    return rows


def _tsv(columns, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v))
                         else v for k, v in row.items()})
    return buffer.getvalue()


def write_group_table(out_dir, controls=frozenset(), comparisons=None):
    """Write ``OUT/group_desc-cst_metrics.tsv`` (n/a for missing values) and return its path."""
    rows = group_rows(out_dir, controls, comparisons)
    return write_text(Path(out_dir) / "group_desc-cst_metrics.tsv", _tsv(GROUP_COLUMNS, rows))


def _norm_rows(norms, levels):
    rows = []
    for (tract, metric), norm in norms.items():
        for node in range(len(norm["mean"])):
            rows.append({"tract": tract, "metric": metric, "node": node,
                         "level": levels[node], "mean": round(float(norm["mean"][node]), 6),
                         "sd": round(float(norm["sd"][node]), 6), "n": int(norm["n"][node])})
    return rows


def _comparison_rows(profiles, comparison):
    t = comparison["t"]
    rows = []
    for node in range(len(profiles["fa_ai"])):
        row = {"node": node, "level": profiles["left"]["level"][node],
               "fa_ai": round(float(profiles["fa_ai"][node]), 6),
               "t_fa_ai": round(float(t[("asymmetry", "fa_ai")][node]), 4)}
        for side, tract in TRACT_NAMES.items():
            row[f"fa_{side}"] = round(float(profiles[side]["fa"][node]), 6)
            row[f"t_fa_{side}"] = round(float(t[(tract, "fa")][node]), 4)
        rows.append(row)
    return rows


COMPARISON_COLUMNS = ("node", "level", "fa_left", "fa_right", "fa_ai", "t_fa_left", "t_fa_right",
                      "t_fa_ai")


def run_group_level(out_dir, bids_dir, thresholds=None):
    """The group level of the BIDS-App: norms, comparisons, group table and group page.

    Controls (``participants.tsv`` ``group`` column, see :mod:`pipeline.tractometry.normative`)
    whose runs were assessable build the norms when there are at least
    :data:`pipeline.tractometry.normative.MIN_CONTROLS`; every other assessable run is then
    compared with them. Without enough controls only the group table and page
    are written.

    Returns
    -------
    dict
        ``table``, ``html``, ``norms`` (None without norms), ``n_controls``,
        ``compared`` (list of per-run comparison TSVs).
    """
    out_dir = Path(out_dir)
    controls = normative.control_labels(bids_dir)
    runs = [(path, m) for path, m in _runs(out_dir) if m["qc"]["assessable"]]
    control_runs = [(path, m) for path, m in runs if m["subject"] in controls]
    others = [(path, m) for path, m in runs if m["subject"] not in controls]
    comparisons, profiles_of, compared, norms_path, norms = {}, {}, [], None, None
    if len(control_runs) >= normative.MIN_CONTROLS:
        control_profiles = [normative.read_profiles(_profiles_path(p)) for p, _ in control_runs]
        norms = normative.normative_profiles(control_profiles)
        sources = [_profiles_path(p) for p, _ in control_runs]
        norms_path = write_text(out_dir / NORMS_NAME, _tsv(
            ("tract", "metric", "node", "level", "mean", "sd", "n"),
            _norm_rows(norms, control_profiles[0]["left"]["level"])))
        write_sidecar(norms_path, description="Normative CST profiles (per-node mean, SD, n) "
                      "of the control participants' runs", sources=sources,
                      extra={"Controls": [p.name[: -len(METRICS_SUFFIX)] for p, _ in control_runs],
                             "SourceChecksums": {str(s): file_sha256(s) for s in sources}})
        for path, _ in others:
            stem = path.name[: -len(METRICS_SUFFIX)]
            profiles = normative.read_profiles(_profiles_path(path))
            comparison = normative.compare_with_norms(profiles, norms, thresholds)
            comparisons[stem], profiles_of[stem] = comparison, profiles
            tsv = write_text(path.with_name(f"{stem}_desc-normative_tractometry.tsv"),
                             _tsv(COMPARISON_COLUMNS, _comparison_rows(profiles, comparison)))
            write_json(path.with_name(f"{stem}_desc-normative_localization.json"), {
                "localization": comparison["localization"],
                "provenance": provenance(inputs=[_profiles_path(path), norms_path],
                                         parameters=comparison["localization"]["thresholds"]),
            })
            write_sidecar(tsv, description="CST profiles of this run against the controls' "
                          "norms: Crawford-Howell single-case t per node", sources=[
                              _profiles_path(path), norms_path])
            compared.append(str(tsv))
    table = write_group_table(out_dir, controls, comparisons)
    page = write_text(out_dir / "group.html", group_html(
        group_rows(out_dir, controls, comparisons), norms, profiles_of, comparisons,
        n_controls=len(control_runs)))
    return {"table": table, "html": page, "norms": norms_path, "n_controls": len(control_runs),
            "compared": compared}


def plot_against_norms(norms, profiles, comparison):
    """FA asymmetry of one run over the controls' mean ± 2 SD band, findings shaded."""
    fig = new_figure(7.5, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    norm = norms[("asymmetry", "fa_ai")]
    nodes = np.arange(len(norm["mean"]))
    ax.fill_between(nodes, norm["mean"] - 2 * norm["sd"], norm["mean"] + 2 * norm["sd"],
                    color="0.8", label="controls: mean ± 2 SD")
    ax.plot(nodes, norm["mean"], color="0.4", lw=1)
    ax.plot(nodes, profiles["fa_ai"], color="C3", lw=1.5, label="this run")
    for segment in comparison["localization"]["segments"]:
        ax.axvspan(segment["start_node"], segment["end_node"], color="C3", alpha=0.15)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlim(0, len(nodes) - 1)
    ax.set_xlabel("node (0: brainstem end)")
    ax.set_ylabel("FA AI (L−R)/(L+R)")
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    return fig


def group_html(rows, norms, profiles_of, comparisons, *, n_controls):
    """The group page: the table, and each compared run's asymmetry against the norms."""
    thresholds = normative.DEFAULT_NORMATIVE_THRESHOLDS
    runs, figures = [], {}
    for stem, comparison in comparisons.items():
        loc = comparison["localization"]
        finding = (f"finding on the {loc['affected_side']} CST at the {loc['level']}, peak "
                   f"node {loc['peak_node']}" if loc["umn_damage"]
                   else "no finding against the norms")
        figures[stem] = figure_slot(
            plot_against_norms, kwargs={"norms": norms, "profiles": profiles_of[stem],
                                        "comparison": comparison},
            words="against_norms", run=stem)
        runs.append({"stem": stem, "finding": finding, "figure": stem})
    return render_page("group.html.j2", {
        "columns": GROUP_COLUMNS,
        "rows": [["n/a" if row[c] is None else str(row[c]) for c in GROUP_COLUMNS]
                 for row in rows],
        "n_runs": len(rows), "n_controls": n_controls,
        "min_controls": normative.MIN_CONTROLS, "reference": normative.REFERENCE,
        "thresholds": None if norms is None else {
            "node_t": f"{thresholds['node_t']:g}", "min_nodes": thresholds["min_nodes"],
            "segment_mean_t": f"{thresholds['segment_mean_t']:g}"},
        "comparisons": runs, "figures": figures})
