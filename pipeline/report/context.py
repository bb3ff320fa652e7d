"""The context of a subject's report: what the page shows, as plain values.

:func:`subject_context` reads the run's files and metrics and returns dicts and lists
of display-ready values (numbers already formatted) and figure slots; the words
around them are in ``report.toml`` and the layout in ``templates/``.

A figure slot is a dict: ``spec`` (a :class:`~pipeline.report.drawing.FigureSpec`
to draw) or ``missing`` (why there is no figure, shown in its place), and ``values``
(what its caption in ``report.toml`` fills in).
"""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .. import __version__
from ..clinical.prognosis import DISCLAIMER
from ..cst import SIDES, TRACT_NAMES
from ..io.profiles_table import read_profiles_tsv
from .context_qc import qc_context
from .drawing import COLORS, figure_slot
from .figures_anatomy import plot_color_fa, plot_glass_brain, plot_tract_slices
from .figures_profiles import (
    band_levels,
    plot_asymmetry_profile,
    plot_diffusivity_profiles,
    plot_profiles,
)
from .inputs import image_volume, load_image, load_tracts, load_vectors
from .prose import (
    REFERENCES,
    calibrated_test_words,
    displayed_parameters,
    entities_label,
    finding_level,
    methods_text,
    peak_words,
    verdict,
)
from .slicing import all_points, world_bbox
from .values import (
    as_float,
    detection_method,
    flatten,
    fmt_mm,
    fmt_num,
    fmt_value,
    humanise,
    ignored_end_nodes,
    lookup,
    qc_notices,
)


def subject_context(*, metrics, profiles_tsv, fa_file, tract_files, mask_file=None,
                    rois_file=None, v1_file=None, template_in_subject_file=None) -> dict:
    """The context of ``subject.html.j2`` (arguments as :func:`pipeline.report.write_report`)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    notes = []
    images = {
        "fa": load_image(fa_file, "FA image", notes),
        "mask": load_image(mask_file, "brain mask", notes) if mask_file is not None else None,
        "rois": load_image(rois_file, "ROI image", notes) if rois_file is not None else None,
        "v1": (load_vectors(v1_file, "principal-eigenvector (V1) image", notes)
               if v1_file is not None else None),
        "template": (load_image(template_in_subject_file, "template-in-subject image", notes)
                     if template_in_subject_file is not None else None),
    }
    streamlines, counts = load_tracts(tract_files, notes)
    profiles = _load_profiles(profiles_tsv, notes)
    if not isinstance(metrics.get("localization"), dict):
        notes.append("The metrics have no localisation result.")

    subject = metrics.get("subject")
    entities = metrics.get("entities")
    figures = _figure_slots(metrics, images, streamlines, profiles, notes)
    qc, qc_figures = qc_context(metrics, counts, images, notes)
    return {
        "label": entities_label(subject, entities) or "unknown subject",
        "subject": subject or "unknown",
        "entities": list(entities.items()) if isinstance(entities, dict) else [],
        "created": lookup(metrics, "provenance", "created")
        or datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "disclaimer": DISCLAIMER,
        "notes": notes,
        "verdict": verdict_context(metrics),
        "prognosis": prognosis_context(metrics),
        "qc": qc,
        "methods": methods_context(metrics),
        "figures": {**figures, **qc_figures},
    }


def _load_profiles(profiles_tsv, notes):
    """The profiles TSV (:func:`pipeline.io.profiles_table.read_profiles_tsv`), {} plus a note
    when it is not given, missing, unreadable or incomplete."""
    if profiles_tsv is None:
        notes.append("No profiles TSV was given.")
        return {}
    if not Path(profiles_tsv).exists():
        notes.append(f"The profiles TSV is missing: {Path(profiles_tsv).name}.")
        return {}
    try:
        profiles = read_profiles_tsv(profiles_tsv)
    except Exception as exc:  # noqa: BLE001 - the report says so and renders the rest
        notes.append(f"The profiles TSV could not be read ({exc}).")
        return {}
    for side in SIDES:
        if side not in profiles:
            notes.append(f"The profiles TSV has no {TRACT_NAMES[side]} rows.")
        elif not np.isfinite(profiles[side]["fa"]).any():
            notes.append(f"The {TRACT_NAMES[side]} profile has no FA values.")
    return profiles


#: The detection rules (``localization.detected_by``) in words.
DETECTION_RULE_NAMES = {"profile": "tract profile asymmetry",
                        "mirrored_asymmetry": "mirrored FA asymmetry (voxel-wise)"}


def verdict_context(metrics) -> dict:
    """The verdict box: :func:`~pipeline.report.prose.verdict` with its facts, the QC
    notices and the table of detected segments."""
    v = verdict(metrics)
    loc = lookup(metrics, "localization") or {}
    if v["status"] == "yes":
        facts = [("UMN damage shown", "yes"), ("Affected side", v["side"]),
                 ("Level", (finding_level(loc) or "unknown").replace("_", " ")),
                 ("Peak (RAS mm)", peak_words(v["peak"]) or "n/a")]
        if loc.get("peak_node") is not None:
            facts.append(("Peak node", loc.get("peak_node")))
        if v.get("confidence"):
            facts.append(("Confidence", v["confidence"]))
        if loc.get("detected_by"):
            facts.append(("Found by", ", ".join(DETECTION_RULE_NAMES.get(rule, rule)
                                                for rule in loc["detected_by"])))
    elif v["status"] == "no":
        facts = [("UMN damage shown", "no"), ("Affected side", "none")]
    else:
        facts = [("UMN damage shown", "not assessable")]
    segments = [s for s in (loc.get("segments") or []) if isinstance(s, dict)]
    # The calibrated rule's segments also carry the t of their strongest window.
    with_t = any("peak_t" in s for s in segments)
    rows = []
    for s in segments:
        levels = " → ".join(str(x).replace("_", " ")
                            for x in (s.get("start_level"), s.get("end_level")) if x)
        cells = [s.get("side"), f"{s.get('start_node')}–{s.get('end_node')}",
                 levels or "n/a", s.get("peak_node"),
                 str(s.get("peak_level") or "n/a").replace("_", " "),
                 peak_words(s.get("peak_ras_mm")) or "n/a", fmt_num(s.get("peak_ai")),
                 fmt_num(s.get("mean_ai"))]
        if with_t:
            cells.append(fmt_num(s.get("peak_t"), 2))
        rows.append(cells)
    return {**v, "facts": facts, "notices": qc_notices(metrics),
            "segments": {"with_t": with_t, "rows": rows} if segments else None}


def prognosis_context(metrics) -> dict | None:
    """The prognosis section; None when the metrics have none."""
    prog = lookup(metrics, "prognosis")
    if not isinstance(prog, dict):
        return None
    rationale = prog.get("rationale") or []
    rationale = [rationale] if isinstance(rationale, str) else list(rationale)
    refs = prog.get("references") or []
    out = {"category": humanise(prog.get("category") or "n/a"),
           "summary": prog.get("summary") or "", "prep2": None, "context": None,
           "references": [refs] if isinstance(refs, str) else refs,
           "disclaimer": prog.get("disclaimer") or DISCLAIMER, "thresholds": None}
    prep2 = prog.get("prep2")
    if isinstance(prep2, dict):
        clinical = lookup(metrics, "clinical") or {}
        out["prep2"] = {
            "prediction": prep2.get("prediction"),
            "missing": ", ".join(prep2.get("missing") or []),
            "scores": [(label, fmt_value(clinical.get(key))) for label, key in (
                ("SAFE score (day 3)", "safe_score"), ("Age (years)", "age"),
                ("MEP status", "mep_status"), ("NIHSS (day 3)", "nihss"))],
            "steps": prep2.get("steps") or []}
        # its steps are listed in the PREP2 block
        rationale = [r for r in rationale if not str(r).startswith("PREP2: ")]
    context = prog.get("context")
    if isinstance(context, dict):
        out["context"] = {"diagnosis": context.get("diagnosis") or "this diagnosis",
                          "label": context.get("label") or "",
                          "source": context.get("source") or "",
                          "statements": context.get("statements") or []}
        statements = set(context.get("statements") or [])
        rationale = [r for r in rationale if r not in statements
                     and not str(r).startswith("Context (")]
    out["rationale"] = rationale
    thresholds = prog.get("thresholds")
    if isinstance(thresholds, dict) and thresholds:
        out["thresholds"] = ", ".join(f"{k} = {fmt_value(v)}" for k, v in thresholds.items())
    return out


def methods_context(metrics) -> dict:
    """The Methods paragraph, the provenance tables and the references."""
    prov = lookup(metrics, "provenance") or {}
    out = {"text": methods_text(metrics), "references": list(REFERENCES.values()),
           "recorded": isinstance(prov, dict) and bool(prov), "software": None,
           "parameters": None, "inputs": None, "input_list": None, "other": None}
    if not out["recorded"]:
        return out
    software = prov.get("software")
    if isinstance(software, dict) and software:
        out["software"] = flatten(software)
    params = prov.get("parameters")
    if isinstance(params, dict) and params:
        out["parameters"] = flatten(displayed_parameters(metrics, params))
    inputs = prov.get("inputs")
    if isinstance(inputs, dict) and inputs:
        out["inputs"] = [{"name": name, "path": info.get("path"), "sha256": info.get("sha256")}
                         if isinstance(info, dict) else {"name": name, "value": fmt_value(info)}
                         for name, info in inputs.items()]
    elif isinstance(inputs, list) and inputs:
        out["input_list"] = [fmt_value(i) for i in inputs]
    rest = {k: v for k, v in prov.items() if k not in ("software", "parameters", "inputs")}
    if rest:
        out["other"] = flatten(rest)
    return out


def tracts_center(streamlines):
    """Mean of all streamline points of both sides (world mm), None without any."""
    pts = [all_points(streamlines[s]) for s in SIDES]
    pts = [p for p in pts if len(p)]
    if not pts:
        return None
    return np.concatenate(pts).mean(axis=0)


def valid_peak(peak):
    """The first three coordinates of ``peak`` as floats, None unless all are finite."""
    if peak is None:
        return None
    try:
        arr = np.asarray(peak, dtype=float).ravel()
    except (TypeError, ValueError):
        return None
    return arr[:3] if arr.size >= 3 and np.all(np.isfinite(arr[:3])) else None


def _figure_slots(metrics, images, streamlines, profiles, notes) -> dict:
    """The slots of the Figures section, by their key in ``report.toml``."""
    fa_img, v1_img, mask_img = images["fa"], images["v1"], images["mask"]
    loc = lookup(metrics, "localization") or {}
    segments = [s for s in (loc.get("segments") or []) if isinstance(s, dict)]
    peak = valid_peak(loc.get("peak_ras_mm")) if loc.get("umn_damage") else None
    peak_node = loc.get("peak_node") if loc.get("umn_damage") else None
    thresholds = loc.get("thresholds") if isinstance(loc.get("thresholds"), dict) else {}
    slots = {}

    center = peak if peak is not None else tracts_center(streamlines)
    sagittal_x, sagittal_side = None, None
    if center is None and fa_img is not None:
        center = world_bbox(fa_img, image_volume(fa_img), 0.02).mean(axis=1)
    if peak is None and center is not None:
        # Through the tracts' centre the sagittal plane would be the midline, between the
        # tracts: cut through the left CST (or the right one) instead.
        for side in SIDES:
            pts = all_points(streamlines[side])
            if len(pts):
                sagittal_x, sagittal_side = float(np.median(pts[:, 0])), side
                break
    if center is None:
        slots["tract_slices"] = figure_slot(
            missing="No FA image and no streamlines: the tract slices cannot be drawn.")
    else:
        slots["tract_slices"] = figure_slot(
            plot_tract_slices, kwargs={"fa_img": fa_img, "streamlines": streamlines,
                                       "center": center, "peak": peak, "sagittal_x": sagittal_x},
            through_peak=peak is not None, colors=COLORS,
            sagittal_tract=TRACT_NAMES[sagittal_side] if peak is None and sagittal_x is not None
            else None, sagittal_x=fmt_mm(sagittal_x),
            missing_inputs=" ".join(n for n in notes if "FA image" in n or "tract" in n.lower()))

    if v1_img is None:
        slots["color_fa"] = figure_slot(missing="Colour FA not available: " + next(
            (n for n in notes if "V1" in n), "no principal-eigenvector (V1) image was given."))
    elif fa_img is None or center is None:
        slots["color_fa"] = figure_slot(missing="Colour FA not available: no FA image.")
    else:
        slots["color_fa"] = figure_slot(plot_color_fa, kwargs={
            "fa_img": fa_img, "v1_img": v1_img, "streamlines": streamlines, "center": center,
            "sagittal_x": sagittal_x})

    have_points = any(len(streamlines[s]) for s in SIDES)
    slots["glass_brain"] = figure_slot(
        plot_glass_brain, kwargs={"streamlines": streamlines, "mask_img": mask_img,
                                  "fa_img": fa_img},
        with_mask=mask_img is not None,
        missing=None if have_points else "Glass brain not available: no streamlines.")

    have_fa = any(np.isfinite(profiles[s]["fa"]).any() for s in profiles)
    slots["fa_profiles"] = figure_slot(
        plot_profiles, kwargs={"profiles": profiles, "metric": "fa", "segments": segments,
                               "peak_node": peak_node, "ylabel": "FA"},
        missing=None if have_fa else "FA profiles not available: "
        + (" ".join(n for n in notes if "profile" in n.lower() or "TSV" in n) or "no data."))

    ai = lookup(metrics, "asymmetry", "fa_ai_profile")
    if not ai and "left" in profiles and "right" in profiles:
        left, right = profiles["left"]["fa"], profiles["right"]["fa"]
        n = min(len(left), len(right))
        with np.errstate(invalid="ignore", divide="ignore"):
            total = left[:n] + right[:n]
            ai = np.where(total > 0, (left[:n] - right[:n]) / total, np.nan).tolist()
    calibrated = detection_method(thresholds) == "calibrated"
    # The calibrated rule has no |AI| line: its band is the scan's own uncertainty.
    se = lookup(metrics, "asymmetry", "fa_ai_profile_se") if calibrated else None
    ai_ok = bool(ai) and any(np.isfinite(as_float(v)) for v in ai)
    slots["fa_asymmetry"] = figure_slot(
        plot_asymmetry_profile, kwargs={
            "ai": ai, "threshold": None if calibrated else thresholds.get("node_ai"), "se": se,
            "segments": segments, "levels": band_levels(profiles), "peak_node": peak_node,
            "end_nodes": ignored_end_nodes(thresholds)},
        **_asymmetry_caption_values(loc, thresholds, band=bool(se)),
        missing=None if ai_ok else "FA asymmetry profile not available (no AI profile in the "
        "metrics and no left/right FA profiles).")

    have_diffusivity = any(np.isfinite(profiles[s][m]).any() for s in profiles
                           for m in ("md", "rd", "ad"))
    slots["diffusivity_profiles"] = figure_slot(
        plot_diffusivity_profiles, kwargs={"profiles": profiles, "segments": segments},
        missing=None if have_diffusivity else "Diffusivity profiles not available.")
    return slots


def _asymmetry_caption_values(loc, thresholds, *, band) -> dict:
    """What the FA asymmetry caption says of the rule the run used; ``band``: whether the
    figure draws the bootstrap ± 2 SE band (calibrated rule)."""
    end_nodes = as_float(ignored_end_nodes(thresholds))
    return {
        "calibrated": detection_method(thresholds) == "calibrated", "band": band,
        "widths": " and ".join(fmt_num(w) for w in thresholds.get("window_nodes") or []),
        "test": calibrated_test_words(loc.get("statistic")),
        "node_ai": None if thresholds.get("node_ai") is None
        else fmt_num(thresholds.get("node_ai")),
        "min_nodes": None if thresholds.get("min_nodes") is None
        else fmt_num(thresholds.get("min_nodes")),
        "segment_mean_ai": None if thresholds.get("segment_mean_ai") is None
        else fmt_num(thresholds.get("segment_mean_ai")),
        "end_nodes": fmt_num(end_nodes) if np.isfinite(end_nodes) and end_nodes >= 1 else None,
    }
