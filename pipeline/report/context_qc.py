"""The context of the report's Quality-control section, as plain values.

Each function returns display-ready values (see :mod:`pipeline.report.context`) of one
block of the section; ``templates/_qc.html.j2`` lays them out.
"""

import math

import numpy as np

from ..cst import SIDES
from ..tractometry.localization import LEVELS
from .drawing import figure_slot
from .figures_qc import (
    plot_gradient_check,
    plot_mask_overlay,
    plot_motion,
    plot_registration,
    plot_roi_overlay,
)
from .prose import ROI_NAMES, landmark_name
from .values import (
    as_float,
    flatten,
    fmt_mm,
    fmt_num,
    fmt_pct,
    fmt_value,
    humanise,
    lookup,
    qc_notices,
    rate_words,
    scaled,
)


def qc_context(metrics, counts, images, notes) -> tuple[dict, dict]:
    """The QC section's values and its figure slots (by their key in ``report.toml``).

    ``counts``: streamlines per side in the tract files (None: not read); ``images``:
    the loaded images by name (``fa``, ``mask``, ``rois``, ``template``; None when
    absent); ``notes``: what was missing among the inputs.
    """
    qc = lookup(metrics, "qc") or {}
    qc = qc if isinstance(qc, dict) else {}
    fa_img = images["fa"]
    warnings = qc.get("warnings")
    params = lookup(metrics, "provenance", "parameters") or {}
    correlation = lookup(qc, "registration", "template_fa_correlation")
    figures = {}
    if images["template"] is not None:
        figures["registration"] = figure_slot(
            plot_registration, kwargs={"fa_img": fa_img, "template_img": images["template"]},
            correlation=None if correlation is None else fmt_num(correlation),
            missing=None if fa_img is not None
            else "Registration figure not available: no FA image.")
    else:
        figures["registration"] = figure_slot(missing="Registration figure skipped: " + next(
            (n for n in notes if "template" in n),
            "no template image resampled to the subject grid was given."))
    preprocessing, preprocessing_figures = preprocessing_qc(
        qc, params if isinstance(params, dict) else {})
    figures.update(preprocessing_figures)
    if images["mask"] is not None:
        figures["brain_mask"] = figure_slot(plot_mask_overlay, kwargs={
            "fa_img": fa_img, "mask_img": images["mask"]})
    else:
        figures["brain_mask"] = figure_slot(missing="Brain mask not available: " + next(
            (n for n in notes if "brain mask" in n), "not given."))
    if images["rois"] is not None:
        figures["rois"] = figure_slot(plot_roi_overlay, kwargs={
            "fa_img": fa_img, "rois_img": images["rois"]})
    else:
        figures["rois"] = figure_slot(missing="ROI image not available: " + next(
            (n for n in notes if "ROI" in n), "not given."))
    other = {k: v for k, v in qc.items() if k != "warnings"}
    return {
        "summary": tract_summary(metrics, counts),
        "detectable_drop": detectable_drop(metrics),
        "warnings": [warnings] if isinstance(warnings, str) else warnings,
        "notices": qc_notices(metrics),
        "registration": registration_qc(qc),
        "tracking": tracking_qc(qc),
        "preprocessing": preprocessing,
        "all_values": flatten(other) if other else None,
    }, figures


def tract_summary(metrics, counts) -> dict:
    """Streamline counts and mean metrics per side, and the asymmetry values."""
    cst = lookup(metrics, "cst") or {}
    # Diffusivities are stored in mm²/s (about 7e-4 in white matter): shown ×10³.
    rows = [("Streamlines (metrics)", "n_streamlines", 1),
            ("Mean length (mm)", "length_mm_mean", 1), ("Mean FA", "fa_mean", 1),
            ("Mean MD (×10⁻³ mm²/s)", "md_mean", 1e3),
            ("Mean RD (×10⁻³ mm²/s)", "rd_mean", 1e3),
            ("Mean AD (×10⁻³ mm²/s)", "ad_mean", 1e3)]
    table = [("Streamlines (tract file)",
              ["missing" if counts.get(s) is None else counts[s] for s in SIDES])]
    table += [(label, [fmt_value(scaled(lookup(cst, s, key), scale)) for s in SIDES])
              for label, key, scale in rows]
    asym = lookup(metrics, "asymmetry") or {}
    # The per-node profiles and their standard errors are drawn, not listed.
    per_node = ("fa_ai_profile", "fa_ai_profile_se", "fa_profile_se")
    listed = {k: v for k, v in asym.items() if k not in per_node}
    return {"rows": table, "asymmetry": flatten(listed) if listed else None}


def detectable_drop(metrics) -> dict | None:
    """The table "What a negative result excludes" (None when not recorded).

    Per level, the smallest drop of one side's FA this scan could have detected
    (``localization.detectable_fa_drop``, from the calibrated rule). Levels the table
    lacks have None (shown as a dash): no window lies wholly in them, so a negative
    result excludes nothing there.
    """
    loc = lookup(metrics, "localization") or {}
    drops = loc.get("detectable_fa_drop")
    if not isinstance(drops, dict) or not drops:
        return None
    widths = [int(as_float(w)) for w in (lookup(loc, "thresholds", "window_nodes") or [])
              if as_float(w) > 0]
    width = min(widths) if widths else None
    window = f"{width} nodes" if width else "the narrowest window"
    lengths = [as_float(lookup(metrics, "cst", side, "length_mm_mean")) for side in SIDES]
    lengths = [v for v in lengths if math.isfinite(v)]
    n_nodes = len(lookup(metrics, "asymmetry", "fa_ai_profile") or [])
    if width and lengths and n_nodes > 1:
        window += f", about {np.mean(lengths) * width / (n_nodes - 1):.0f} mm of this tract"
    statistic = loc.get("statistic") if isinstance(loc.get("statistic"), dict) else {}
    threshold = as_float(statistic.get("threshold"))
    at = (f" at the calibrated threshold |t| = {threshold:.1f} (a "
          f"{rate_words(statistic.get('false_positive_rate'))} chance of a finding on a "
          f"healthy scan)" if math.isfinite(threshold) else "")
    mirror = loc.get("mirrored_asymmetry") if isinstance(loc.get("mirrored_asymmetry"),
                                                         dict) else {}
    focal = mirror.get("detectable_fa_drop") or {}
    levels = list(LEVELS) + [k for k in drops if k not in LEVELS]
    return {"at": at, "window": window, "focal": bool(focal),
            "rows": [(str(level).replace("_", " "),
                      fmt_pct(drops[level]) if level in drops else None,
                      fmt_pct(focal[level]) if level in focal else None) for level in levels]}


def registration_qc(qc) -> dict | None:
    """Template correlation and ROI coverage against their limits (None: not recorded)."""
    reg = qc.get("registration") if isinstance(qc, dict) else None
    if not isinstance(reg, dict) or not reg:
        return None
    limits = qc.get("limits") if isinstance(qc.get("limits"), dict) else {}
    r = as_float(reg.get("template_fa_correlation"))
    r_min = as_float(limits.get("min_template_correlation"))
    out = {"correlation": fmt_num(r),
           "limit": fmt_num(r_min) if math.isfinite(r_min) else None,
           "ok": (r >= r_min) if math.isfinite(r) and math.isfinite(r_min) else None,
           "coverage": None}
    coverage = reg.get("roi_coverage")
    if not isinstance(coverage, dict) or not coverage:
        return out
    c_min = as_float(limits.get("min_roi_coverage"))
    brainstem_min = as_float(limits.get("min_brainstem_coverage"))
    rows = []
    for name in dict.fromkeys([k.rsplit("_", 1)[0] for k in coverage]):
        limit = brainstem_min if name == "peduncle" and math.isfinite(brainstem_min) else c_min
        cells = []
        for hemi in ("L", "R"):
            value = as_float(coverage.get(f"{name}_{hemi}"))
            cells.append(None if f"{name}_{hemi}" not in coverage else {
                "text": fmt_pct(value),
                "low": math.isfinite(limit) and math.isfinite(value) and value < limit})
        rows.append({"label": ROI_NAMES.get(name, humanise(name)), "name": name,
                     "cells": cells})
    out["coverage"] = {"limit": fmt_pct(c_min) if math.isfinite(c_min) else None,
                       "brainstem_limit": fmt_pct(brainstem_min)
                       if math.isfinite(brainstem_min) else None, "rows": rows}
    return out


def tracking_qc(qc) -> dict | None:
    """Seeds, landmarks and streamlines per stage and side (None: not recorded)."""
    trk = qc.get("tracking") if isinstance(qc, dict) else None
    if not isinstance(trk, dict) or not trk:
        return None
    limits = qc.get("limits") if isinstance(qc.get("limits"), dict) else {}
    facts = [("Seeds", fmt_value(trk.get("n_seeds"))),
             ("Streamlines tracked", fmt_value(trk.get("n_streamlines_tracked")))]
    if trk.get("method"):
        reason = lookup(trk, "model_choice", "reason")
        facts.insert(0, ("Model", str(trk["method"]) + (f" ({reason})" if reason else "")))
    if trk.get("inferior_landmark"):
        facts.append(("Inferior landmark", landmark_name(trk["inferior_landmark"])))
    start_z = as_float(trk.get("profile_start_mni_z"))
    if math.isfinite(start_z):
        facts.append(("Profiles start at (both sides)", f"MNI z = {fmt_mm(start_z)} mm"))
    tried = trk.get("landmark_streamlines")
    if isinstance(tried, dict) and tried:
        facts.append(("Streamlines per landmark tried (left / right)", "; ".join(
            f"{landmark_name(name)} {fmt_value(lookup(counts, 'left'))} / "
            f"{fmt_value(lookup(counts, 'right'))}" for name, counts in tried.items())))
    out = {"facts": facts, "sides": None}
    sides = trk.get("sides")
    if not isinstance(sides, dict) or not sides:
        return out
    n_min = as_float(limits.get("min_streamlines"))
    stages = (("selected", "Selected (through the ipsilateral ROIs)"),
              ("clipped", "Clipped (profile start height → motor cortex)"),
              ("cleaned", "Cleaned (outliers removed; the final CST)"))
    rows = []
    for key, label in stages:
        cells = []
        for side in SIDES:
            value = lookup(sides, side, key)
            cells.append({"text": fmt_value(value),
                          "low": key == "cleaned" and math.isfinite(n_min)
                          and math.isfinite(as_float(value)) and as_float(value) < n_min})
        rows.append((label, cells))
    known = {k for k, _ in stages}
    for key in sorted({k for s in sides.values() if isinstance(s, dict) for k in s} - known):
        rows.append((humanise(key), [{"text": fmt_value(lookup(sides, s, key)), "low": False}
                                     for s in SIDES]))
    out["sides"] = {"min_streamlines": fmt_num(n_min) if math.isfinite(n_min) else None,
                    "rows": rows}
    return out


def preprocessing_qc(qc, params) -> tuple[list, dict]:
    """The preprocessing table's rows, and the motion and gradient-check figure slots
    when the run recorded them."""
    noise = qc.get("noise") if isinstance(qc.get("noise"), dict) else {}
    motion = qc.get("motion") if isinstance(qc.get("motion"), dict) else None
    outliers = qc.get("outliers") if isinstance(qc.get("outliers"), dict) else {}
    check = qc.get("gradient_check") if isinstance(qc.get("gradient_check"), dict) else None
    tensor = lookup(qc, "preprocessing", "tensor") or {}
    pre_params = params.get("preprocessing") if isinstance(params.get("preprocessing"), dict) \
        else {}
    flagged = [int(v) for v in outliers.get("volumes") or []]
    rows = [("Denoising", noise.get("method", lookup(qc, "preprocessing", "denoise"))),
            ("Median noise σ (signal units)",
             noise.get("noise_sigma_median", lookup(qc, "preprocessing", "noise_sigma_median"))),
            ("SNR of the mean b0 (median, brain)", noise.get("snr_b0")),
            ("Gibbs-ringing removal", pre_params.get("gibbs")),
            ("Brain-mask volume (mL)",
             noise.get("brain_mask_ml", lookup(qc, "preprocessing", "brain_mask_ml")))]
    if motion:
        rows += [("Motion model", motion.get("model")),
                 ("Max translation (mm)", motion.get("max_translation_mm")),
                 ("Max rotation (°)", motion.get("max_rotation_deg")),
                 ("Mean framewise displacement (mm)", motion.get("mean_framewise_displacement_mm"))]
    else:
        rows.append(("Motion correction", "off"))
    reasons = outliers.get("reasons") or {}
    rows.append(("Outlier volumes", ", ".join(f"{v} ({reasons.get(str(v), reasons.get(v, ''))})"
                                              for v in flagged) or "none"))
    if check:
        rows += [("Gradient-table check", check.get("status")),
                 ("Correction applied", check.get("correction") or "none"),
                 ("Coherence before → after (mm)",
                  f"{fmt_num(check.get('score_before'))} → {fmt_num(check.get('score_after'))}")]
    if tensor:
        rows += [("Tensor fit: shells (s/mm²)",
                  ", ".join(f"{b:g}" for b in tensor.get("shells", []))),
                 ("Tensor fit: volumes used", tensor.get("n_volumes"))]
    figures = {}
    if motion and motion.get("translation_mm"):
        figures["motion"] = figure_slot(
            plot_motion, kwargs={"motion": motion, "outlier_volumes": flagged},
            excluded=bool(outliers.get("excluded")))
    if check and check.get("candidates"):
        figures["gradient_check"] = figure_slot(
            plot_gradient_check, kwargs={"candidates": check["candidates"],
                                         "chosen": check.get("correction")},
            corrected=check.get("status") == "corrected")
    return [(k, v) for k, v in rows if v is not None], figures
