"""Quality control of a run: the silent-failure patterns that make the CST not
assessable, and the notices a reader of an assessable run must see."""

from ..cst import HEMI, SIDES

#: Quality-control limits below which the CST is reported as not assessable.
DEFAULT_QC_LIMITS = {"min_streamlines": 20, "min_roi_coverage": 0.6,
                     # The cerebral peduncles anchor the brainstem end of every profile, so
                     # they must lie in the field of view almost whole: healthy scans here
                     # cover 0.996-1.0 of them; sub-uih01, whose field of view stops at the
                     # midbrain, 0.53-0.68 (varying with the registration).
                     "min_brainstem_coverage": 0.9,
                     "min_template_correlation": 0.4, "min_template_mask_dice": 0.6,
                     # Healthy scans here: 0.95-1.07; a partial field of view squashed the
                     # template to 0.82 along one axis.
                     "affine_scale_range": [0.85, 1.2]}


def quality_control(registration_qc, tracking_qc, summary, limits):
    """Known silent-failure patterns → (assessable, reasons)."""
    reasons = []
    coverage = registration_qc["roi_coverage"]
    for roi, where, limit in (
            ("peduncle", "the brainstem (cerebral peduncles)", "min_brainstem_coverage"),
            ("plic", "the internal capsules", "min_roi_coverage"),
            ("motor", "the motor cortex", "min_roi_coverage")):
        low = [s for s in SIDES if coverage.get(f"{roi}_{HEMI[s]}", 0) < limits[limit]]
        if low:
            reasons.append(f"The field of view or brain mask does not cover {where} "
                           f"({', '.join(low)}): the CST cannot be followed along its course.")
    r = registration_qc["template_fa_correlation"]
    overlap = registration_qc["template_mask_dice"]
    if r < limits["min_template_correlation"] or overlap < limits["min_template_mask_dice"]:
        reasons.append(f"Registration to the MNI FA template looks failed (FA correlation "
                       f"{r:.2f}, limit {limits['min_template_correlation']}; brain-mask Dice "
                       f"{overlap:.2f}, limit {limits['min_template_mask_dice']}).")
    low, high = limits["affine_scale_range"]
    scales = registration_qc["affine_scales"]
    if min(scales) < low or max(scales) > high:
        reasons.append(f"The template had to be stretched implausibly to fit (scale factors "
                       f"{', '.join(f'{v:.2f}' for v in scales)}; expected {low}-{high}): "
                       f"the field of view may miss part of the brain.")
    for side in SIDES:
        n = summary[side]["n_streamlines"]
        if n < limits["min_streamlines"]:
            reasons.append(f"Too few {side} CST streamlines ({n} < {limits['min_streamlines']}).")
    return not reasons, reasons


def preprocessing_notices(pre_qc):
    """What a reader must know about the input and what preprocessing changed (header
    warnings, corrected table, dropped volumes)."""
    notices = [f"Image header ({run['file']}): {warning}"
               for run in pre_qc.get("header") or [] for warning in run["warnings"]]
    check = pre_qc.get("gradient_check") or {}
    if check.get("status") == "corrected":
        notices.append(f"The gradient table was corrected ({check['correction']}): fibre "
                       f"coherence {check['score_before']:.1f} -> {check['score_after']:.1f} mm "
                       f"mean streamline length. Check the b-vectors of this scan.")
    flagged = (pre_qc.get("outliers") or {}).get("volumes", [])
    if flagged:
        what = "left out of the tensor fit" if (pre_qc["outliers"].get("excluded")) else \
            "kept in the fit (--outliers report)"
        notices.append(f"{len(flagged)} outlier volume(s) ({', '.join(map(str, flagged))}) "
                       f"{what}.")
    return notices


#: Head motion that makes a run's QC carry a notice (it stays assessable). No fixed cut-off
#: for a diffusion run is published: FSL's eddy QC (Bastiani et al. 2019,
#: doi:10.1016/j.neuroimage.2018.09.073) ranks a subject's motion against its own study, and
#: the 0.5 mm framewise displacement (FD) at which Power et al. 2012
#: (doi:10.1016/j.neuroimage.2011.10.018) censor fMRI frames does not carry over: diffusion
#: volumes are seconds apart and change contrast with every direction, so FD runs higher
#: (0.44-1.23 mm mean in the cooperative scans of ../shared/data: siemens01, philips02,
#: toshiba01). These levels are therefore this project's, set on those scans: mean FD above
#: 1.5 mm, or a translation from the reference of more than 2 mm (about one voxel of
#: 1.75-3 mm) along any axis. sub-philips01 (4.6 mm drift), sub-siemens02 (jumps) and both
#: runs of sub-siemens03 (2.6-3.0 mm) get the notice. Why it matters: motion alone shifts FA
#: and diffusivities (Yendiki et al. 2014, doi:10.1016/j.neuroimage.2013.11.027).
MOTION_NOTICE_LIMITS = {"mean_framewise_displacement_mm": 1.5, "max_translation_mm": 2.0}


def motion_notices(motion_qc, limits=None):
    """A QC notice (not a failure) when the head moved more than :data:`MOTION_NOTICE_LIMITS`.

    ``motion_qc``: the motion step's QC (``qc.motion`` of the metrics), None when motion
    correction was off. Returns a list with at most one sentence, giving the measured
    values, the limits and their source.
    """
    limits = {**MOTION_NOTICE_LIMITS, **(limits or {})}
    if not motion_qc:
        return []
    measured = [(key, what, motion_qc.get(key)) for key, what in (
        ("mean_framewise_displacement_mm", "mean framewise displacement (Power et al. 2012)"),
        ("max_translation_mm", "largest translation from the reference"))]
    if not any(value is not None and value > limits[key] for key, _, value in measured):
        return []
    values = ", ".join(f"{what} {value:.2f} mm (notice above {limits[key]:g} mm)"
                       for key, what, value in measured if value is not None)
    return [f"Heavy head motion: {values}. These notice levels were set on this project's "
            f"scans: no fixed cut-off for diffusion MRI is published. The volumes were "
            f"realigned, but motion also biases FA and diffusivities (Yendiki et al. 2014): "
            f"check the motion plot, and compare with other runs with care."]
