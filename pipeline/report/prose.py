"""The report's prose: the verdict in plain words and the Methods paragraph.

Both are generated from the recorded metrics and parameters, never from the current
defaults, so that the text describes the run that was made.
"""

import math

from markupsafe import Markup, escape

from .. import __version__
from ..clinical import prognosis
from ..cst import SIDES
from ..tractometry.localization import BOUNDARY_MARGIN_MM
from ..tractometry.uncertainty import N_BOOTSTRAP
from .values import (
    as_float,
    detection_method,
    fmt_mm,
    fmt_num,
    fmt_p,
    fmt_pct,
    fmt_value,
    humanise,
    lookup,
    peak_words,
    rate_words,
)

#: The works the Methods paragraph cites, listed under References.
REFERENCES = {
    "garyfallidis2014": ("Garyfallidis E, Brett M, Amirbekian B, et al. Dipy, a library for the "
                         "analysis of diffusion MRI data. Front Neuroinform 2014;8:8. "
                         "doi:10.3389/fninf.2014.00008"),
    "veraart2016": ("Veraart J, Novikov DS, Christiaens D, Ades-Aron B, Sijbers J, Fieremans E. "
                    "Denoising of diffusion MRI using random matrix theory. NeuroImage "
                    "2016;142:394–406. doi:10.1016/j.neuroimage.2016.08.016"),
    "avants2008": ("Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image "
                   "registration with cross-correlation: evaluating automated labeling of "
                   "elderly and neurodegenerative brain. Med Image Anal 2008;12:26–41. "
                   "doi:10.1016/j.media.2007.06.004"),
    "yeatman2012": ("Yeatman JD, Dougherty RF, Myall NJ, Wandell BA, Feldman HM. Tract profiles "
                    "of white matter properties: automating fiber-tract quantification. PLoS One "
                    "2012;7:e49790. doi:10.1371/journal.pone.0049790"),
    "kellner2016": ("Kellner E, Dhital B, Kiselev VG, Reisert M. Gibbs-ringing artifact removal "
                    "based on local subvoxel-shifts. Magn Reson Med 2016;76:1574–1581. "
                    "doi:10.1002/mrm.26054"),
    "jeurissen2014": ("Jeurissen B, Leemans A, Sijbers J. Automated correction of improperly "
                      "rotated diffusion gradient orientations in diffusion weighted MRI. Med "
                      "Image Anal 2014;18:953–962. doi:10.1016/j.media.2014.05.012"),
    "jeurissen2014msmt": ("Jeurissen B, Tournier JD, Dhollander T, Connelly A, Sijbers J. "
                          "Multi-tissue constrained spherical deconvolution for improved "
                          "analysis of multi-shell diffusion MRI data. NeuroImage "
                          "2014;103:411–426. doi:10.1016/j.neuroimage.2014.07.061"),
    "leemans2009": ("Leemans A, Jones DK. The B-matrix must be rotated when correcting for "
                    "subject motion in DTI data. Magn Reson Med 2009;61:1336–1349. "
                    "doi:10.1002/mrm.21890"),
    "power2012": ("Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE. Spurious but "
                  "systematic correlations in functional connectivity MRI networks arise from "
                  "subject motion. NeuroImage 2012;59:2142–2154. "
                  "doi:10.1016/j.neuroimage.2011.10.018"),
    "whitcher2008": ("Whitcher B, Tuch DS, Wisco JJ, Sorensen AG, Wang L. Using the wild "
                     "bootstrap to quantify uncertainty in diffusion tensor imaging. Hum Brain "
                     "Mapp 2008;29:346–362. doi:10.1002/hbm.20395"),
    "stinear2007": prognosis.REFERENCES["stinear2007"],
    "stinear2012": prognosis.REFERENCES["stinear2012"],
}
#: Readable names of the CST ROIs' regions (the QC tables, the inferior landmark).
ROI_NAMES = {"motor": "Motor cortex", "plic": "Posterior limb of the internal capsule",
              "peduncle": "Cerebral peduncle", "pons": "Pons", "medulla": "Medulla"}


def entities_label(subject, entities) -> str:
    """'sub-01_ses-1_dir-AP': the subject and its BIDS entities, as in file names."""
    parts = []
    if subject:
        parts.append(f"sub-{subject}" if not str(subject).startswith("sub-") else str(subject))
    if isinstance(entities, dict):
        for key, value in entities.items():
            if value not in (None, "") and key not in ("subject", "sub"):
                parts.append(f"{key}-{value}")
    return "_".join(parts)


def level_words(level) -> str:
    """'the internal capsule' for ``internal_capsule``; 'an unknown level' for none."""
    if not level:
        return "an unknown level"
    text = str(level).replace("_", " ")
    return f"the {text}"


def finding_level(loc):
    """Level of the finding's peak: its atlas level, or "cerebral_peduncle /
    internal_capsule boundary" when ``levels_near_boundary`` names two levels (the peak
    lies within :data:`pipeline.tractometry.localization.BOUNDARY_MARGIN_MM` of their boundary)."""
    near = [str(level) for level in (loc.get("levels_near_boundary") or []) if level]
    return " / ".join(near) + " boundary" if len(near) >= 2 else loc.get("level")


def _test_words(statistic, measured, symbol, healthy) -> str:
    """One test's statistic in words: "<measured> <symbol> = 2.8 against a threshold of
    3.5 (calibrated to a 1 % chance of a finding on <healthy>; p = 0.10)"; '' when
    ``statistic`` has no finite value and threshold."""
    if not isinstance(statistic, dict):
        return ""
    value, threshold = as_float(statistic.get("value")), as_float(statistic.get("threshold"))
    if not (math.isfinite(value) and math.isfinite(threshold)):
        return ""
    # One decimal, two where one would make the statistic and the threshold look equal.
    digits = 1 if f"{value:.1f}" != f"{threshold:.1f}" else 2
    return (f"{measured} {symbol} = {value:.{digits}f} against a threshold "
            f"of {threshold:.{digits}f} (calibrated to a "
            f"{rate_words(statistic.get('false_positive_rate'))} chance of a finding on "
            f"{healthy}; {fmt_p(statistic.get('p_value'))})")


def calibrated_test_words(statistic) -> str:
    """The calibrated rule's test in words (``localization.statistic``): "the largest
    window asymmetry was |t| = 2.8 against a threshold of 3.5 (calibrated to a 1 %
    chance of a finding on a healthy scan of this quality; p = 0.10)"."""
    return _test_words(statistic, "the largest window asymmetry was", "|t|",
                       "a healthy scan of this quality")


def mirrored_test_words(mirror) -> str:
    """The mirrored-asymmetry rule's test in words (``localization.mirrored_asymmetry``):
    "the mirrored FA asymmetry in the CST volume reached |z| = 3.1 against a threshold
    of 5.4 (calibrated to a 1 % chance of a finding on a healthy scan; p = 0.20)"."""
    return _test_words(mirror, "the mirrored FA asymmetry in the CST volume reached", "|z|",
                       "a healthy scan")


def verdict(metrics) -> dict:
    """Plain-words verdict from the metrics.

    The sentence states the test of the rule the run used
    (``localization.thresholds.method``): under the calibrated rule the largest
    window |t|, its threshold, the false-finding rate it is calibrated to and the
    p value; under the fixed-AI rule the |AI| thresholds no segment reached.

    Parameters
    ----------
    metrics : dict
        The run's metrics; any key may be missing.

    Returns
    -------
    dict
        ``status`` ('yes' | 'no' | 'not_assessable'), ``headline``, ``sentence``,
        ``side``, ``level``, ``peak``, ``confidence`` and ``reasons`` (list of str).
    """
    loc = lookup(metrics, "localization")
    reasons = [str(w) for w in (lookup(metrics, "qc", "warnings", default=[]) or [])]
    out = {"status": "not_assessable", "side": None, "level": None, "peak": None,
           "reasons": reasons, "confidence": None}
    if not isinstance(loc, dict):
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: not assessable"
        out["sentence"] = "No localisation result is available in the metrics."
        return out
    if not loc.get("assessable", True):
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: not assessable"
        out["sentence"] = ("Quality control found that the corticospinal tracts could not be "
                           "assessed; no statement on upper-motor-neuron damage is made.")
        if not reasons:  # fall back on the prognosis rationale (QC reasons there too)
            rationale = lookup(metrics, "prognosis", "rationale")
            if isinstance(rationale, str):
                rationale = [rationale]
            if isinstance(rationale, list):
                reasons.extend(str(r) for r in rationale)
        return out
    thr = lookup(loc, "thresholds") or {}
    method = detection_method(thr)
    profile_test = calibrated_test_words(loc.get("statistic")) if method == "calibrated" else ""
    mirror_test = mirrored_test_words(loc.get("mirrored_asymmetry"))
    detected_by = loc.get("detected_by") or []
    if loc.get("umn_damage") and detected_by == ["mirrored_asymmetry"]:
        test = mirror_test
    elif loc.get("umn_damage"):
        test = profile_test
    else:
        test = "; ".join(words for words in (profile_test, mirror_test) if words)
    if loc.get("umn_damage"):
        side = loc.get("affected_side") or "unknown"
        peak = loc.get("peak_ras_mm")
        confidence = loc.get("confidence")
        out.update(status="yes", side=side, level=loc.get("level"), peak=peak,
                   confidence=confidence)
        where = f" (peak at {peak_words(peak)})" if peak is not None else ""
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: yes"
        out["sentence"] = (f"Reduced FA along the {side} CST at "
                           f"{level_words(finding_level(loc))}{where}")
        if test:
            out["sentence"] += f": {test}" + (f", confidence {confidence}" if confidence else "")
        out["sentence"] += "."
        if side in SIDES:
            body = "right" if side == "left" else "left"
            out["sentence"] += (f" A lesion of the {side} CST would affect the {body} side of "
                                f"the body.")
        return out
    detail = f": {test}" if test else ""
    if method == "fixed-ai" and "node_ai" in thr and "min_nodes" in thr:
        detail = (f": no segment of the FA asymmetry profile reached |AI| ≥ "
                  f"{fmt_num(thr['node_ai'])} over ≥ {fmt_num(thr['min_nodes'])} "
                  f"consecutive nodes")
        if "segment_mean_ai" in thr:
            detail += f" with a mean |AI| ≥ {fmt_num(thr['segment_mean_ai'])}"
    out.update(status="no", side="none")
    out["headline"] = "Upper-motor-neuron (UMN) damage shown: no"
    out["sentence"] = f"No imaging evidence of upper-motor-neuron damage along either CST{detail}."
    if isinstance(loc.get("detectable_fa_drop"), dict) and loc["detectable_fa_drop"]:
        out["sentence"] += (" The smallest FA drop this scan could have detected at each level "
                            "is listed under “What a negative result excludes”.")
    return out


def landmark_name(name) -> str:
    """A brainstem landmark (``qc.tracking.inferior_landmark``) in words: 'cerebral peduncle'."""
    return ROI_NAMES.get(str(name), humanise(name)).lower()


_DENOISE_WORDS = {"mppca": "denoised with MP-PCA (Veraart et al. 2016)",
                  "patch2self": "denoised with Patch2Self",
                  "nlmeans": "denoised with non-local means"}


def _p(params, *keys):
    """A parameter as display text, or None when not recorded."""
    value = lookup(params, *keys)
    if value is None or isinstance(value, (dict, list)):
        return None
    return fmt_value(value)


def _fitted_shells_words(metrics, params) -> str:
    """What the tensor was fitted to, from the shells actually used
    (``qc.preprocessing.tensor``), not from the ``--dti-max-bvalue`` setting alone."""
    tensor = lookup(metrics, "qc", "preprocessing", "tensor") or {}
    shells = [as_float(b) for b in (tensor.get("shells") or []) if math.isfinite(as_float(b))]
    limit = as_float(lookup(params, "preprocessing", "dti_max_bvalue"))
    if not shells:
        return ("the b = 0 volumes and the shells up to "
                + (f"{fmt_num(limit)} s/mm²" if math.isfinite(limit) else "(not recorded)")
                + " (the shells used were not recorded)")
    values = ", ".join(fmt_num(b) for b in sorted(shells))
    words = (f"the b = 0 volumes and the b = {values} s/mm² shell" if len(shells) == 1 else
             f"the b = 0 volumes and the b = {values} s/mm² shells")
    n = as_float(tensor.get("n_volumes"))
    if math.isfinite(n):
        words += f" ({fmt_num(n)} volumes)"
    if math.isfinite(limit) and min(shells) > limit:
        words += (f"; every shell lay above the {fmt_num(limit)} s/mm² preferred for the "
                  f"tensor, so the lowest was used")
    return words


def methods_text(metrics) -> Markup:
    """The Methods paragraph, as HTML (its values escaped), from the run's recorded parameters."""
    prov = lookup(metrics, "provenance") or {}
    params = prov.get("parameters") if isinstance(prov, dict) else None
    params = params if isinstance(params, dict) else {}
    software = prov.get("software") if isinstance(prov, dict) else None
    software = software if isinstance(software, dict) else {}

    def ver(name, label=None):
        v = software.get(name)
        return f"{label or name} {escape(v)}" if v else (label or name)

    def val(*keys, unit=""):
        text = _p(params, *keys)
        return f"{escape(text)}{unit}" if text is not None else "(not recorded)"

    def pct(*keys):
        value = as_float(lookup(params, *keys))
        return fmt_pct(value) if math.isfinite(value) else "(not recorded)"

    pre = params.get("preprocessing") if isinstance(params.get("preprocessing"), dict) else {}
    sentences = []
    denoise = pre.get("denoise")
    if denoise in (None, ""):
        den = "denoised (method not recorded)"
    elif str(denoise).lower() in ("none", "false", "off", "no"):
        den = "not denoised"
    else:
        den = _DENOISE_WORDS.get(str(denoise).lower(), f"denoised ({escape(denoise)})")
    sentences.append(
        f"Diffusion-weighted images were {den}; volumes with b ≤ "
        f"{val('preprocessing', 'b0_threshold', unit=' s/mm²')} "
        f"were treated as b = 0, and the brain mask was computed with "
        f"<code>{val('preprocessing', 'brain_mask')}</code> (the mean b = 0 and the mean "
        f"diffusion-weighted image, united, so that a dark brainstem is kept).")
    if pre.get("gibbs"):
        sentences.append("Gibbs ringing was removed slice by slice with local sub-voxel shifts "
                         "(Kellner et al. 2016).")
    motion = pre.get("motion")
    if motion and motion != "none":
        sentences.append(
            f"Each volume was registered to the mean b = 0 image ({escape(motion)}, mutual "
            f"information; DIPY) to correct head motion"
            + (" and eddy-current distortion" if motion == "affine" else "")
            + ", and its b-vector was rotated with it (Leemans and Jones 2009).")
    if pre.get("outliers"):
        sentences.append(
            "Volumes with slice-wise signal dropout or extreme motion were flagged"
            + (" and left out of the tensor fit." if pre["outliers"] == "exclude" else
               " (and kept in the fit)."))
    if pre.get("gradient_check") and pre["gradient_check"] != "off":
        sentences.append(
            "The gradient table was checked for axis flips and permutations by fibre coherence "
            "(mean length of tensor streamlines for each of the 24 signed axis permutations; "
            "Jeurissen et al. 2014)"
            + (", and corrected when another table was clearly more coherent."
               if pre["gradient_check"] == "fix" else "."))
    sentences.append(
        f"The diffusion tensor was fitted by {val('preprocessing', 'tensor_fit')} with "
        f"{ver('dipy', 'DIPY')} (Garyfallidis et al. 2014) to "
        f"{_fitted_shells_words(metrics, params)}, giving FA, MD, RD, AD and the principal "
        f"eigenvector.")
    sentences.append(
        "The subject FA map was registered to the MNI152 FA template (affine, then SyN; "
        "Avants et al. 2008) and template CST regions of interest (motor cortex, posterior "
        "limb of the internal capsule, cerebral peduncle, pons) were warped to the subject.")
    tracking_qc = lookup(metrics, "qc", "tracking") or {}
    tracking_qc = tracking_qc if isinstance(tracking_qc, dict) else {}
    start_z = as_float(tracking_qc.get("profile_start_mni_z"))
    choice = tracking_qc.get("model_choice")
    if isinstance(choice, dict) and choice.get("model") == "csd":
        getter = ("Probabilistic" if lookup(metrics, "provenance", "parameters", "tracking",
                                          "direction") == "prob" else "Deterministic")
        if choice.get("csd_kind") == "msmt":
            sentences.append(_msmt_words(choice, software))
            model_words = f"{getter} CSD tractography on the white-matter fODF"
        else:
            sentences.append(
                f"Fibre orientation distributions were estimated by constrained spherical "
                f"deconvolution (Tournier et al. 2007; DIPY) of order "
                f"{escape(fmt_value(choice.get('sh_order')))} on the b = "
                f"{escape(fmt_value(choice.get('shell_bvalue')))} s/mm² shell "
                f"({escape(fmt_value(choice.get('n_directions')))} directions), with a "
                f"single-fibre response from "
                f"{escape(fmt_value(choice.get('n_response_voxels')))} voxels of high FA.")
            model_words = f"{getter} CSD tractography"
    else:
        model_words = "Deterministic tensor tractography"
    gap_fa = as_float(lookup(params, "tracking", "gap_fa"))
    gap_clause = (
        f", except that within {val('tracking', 'corridor_radius_mm', unit=' mm')} of the "
        f"line through each side's CST ROIs tracking went on through FA down to "
        f"{val('tracking', 'gap_fa')} (so that a focal lesion does not cut the tract it "
        f"damages)"
        if math.isfinite(gap_fa) and gap_fa < as_float(lookup(params, "tracking", "fa_stop"))
        else "")
    sentences.append(
        f"{model_words} was seeded with {val('tracking', 'seeds_per_voxel')} "
        f"seeds per voxel in the brainstem and internal-capsule ROIs (random seed "
        f"{val('seed')}), with a step of {val('tracking', 'step_mm', unit=' mm')}, stopping "
        f"where FA &lt; {val('tracking', 'fa_stop')} or the turning angle exceeds "
        f"{val('tracking', 'max_angle_deg', unit='°')}{gap_clause}. The inferior landmark "
        f"was the lowest brainstem level (medulla, else pons, else cerebral peduncle) of which "
        f"at least {pct('tracking', 'min_coverage')} of each side's ROI lay in the field of "
        f"view and that both tracts still followed"
        + (f" (here the {escape(landmark_name(tracking_qc['inferior_landmark']))})"
           if tracking_qc.get("inferior_landmark") else "")
        + ". Per hemisphere, streamlines passing through the ipsilateral ROIs from that "
        "landmark up and through none of the contralateral peduncle, internal-capsule and "
        "motor ROIs were kept (the corticospinal tract, CST), clipped from one MNI height on "
        "both sides (the lowest that most streamlines of both sides reach, not below the "
        "landmark"
        + (f"; here z = {escape(fmt_mm(start_z))} mm" if math.isfinite(start_z) else "")
        + ") to the motor cortex, and cleaned of outliers.")
    sentences.append(
        "Each CST was resampled to 100 nodes from that height (node 0) to the cortex "
        "(node 99), so that node 0 lies at the same anatomy on both sides, and diffusion "
        "metrics were averaged at each node with weights decreasing with distance from the "
        "bundle core (tract profiles; Yeatman et al. 2012); each node's level was named from "
        "its MNI height (the atlas level bands).")
    detection = lookup(metrics, "localization", "thresholds") or params.get("localization")
    if detection_method(detection) == "calibrated":
        windows = [fmt_num(w) for w in (lookup(params, "localization", "window_nodes") or [])]
        model = (lookup(metrics, "localization", "statistic", "healthy_model")
                 or lookup(params, "localization", "healthy_model", "source"))
        rate = lookup(params, "localization", "false_positive_rate")
        sentences.append(
            f"Upper-motor-neuron damage was sought in the FA asymmetry index AI = "
            f"(FA<sub>L</sub> − FA<sub>R</sub>) / (FA<sub>L</sub> + FA<sub>R</sub>) at every "
            f"node (none left out), by a test calibrated to this scan. {N_BOOTSTRAP} bootstrap "
            f"replicates of the profiles (a wild bootstrap of the tensor fit, Whitcher et al. "
            f"2008, with each side's streamlines resampled) gave the scan's own standard error "
            f"of AI at every node, and a model of the left-right asymmetry of healthy CSTs (an "
            f"SD per level"
            + (f"; {escape(model)}" if model else "")
            + ") added what anatomy and registration contribute. The mean AI over every "
            f"window of {escape(' and '.join(windows)) or '(not recorded)'} consecutive nodes, "
            f"divided by its standard error, gave a t statistic, and a finding needed the "
            f"largest |t| to exceed the threshold that {val('localization', 'null_draws')} "
            f"simulated healthy profiles of this scan (bootstrap noise plus healthy asymmetry) "
            f"exceed with probability {val('localization', 'false_positive_rate')}: whatever "
            f"its quality, a scan of a healthy subject has a {escape(rate_words(rate))} chance "
            f"of a false finding. The p value is the fraction of those simulated profiles with "
            f"a larger |t|; the confidence is high when p is at most a tenth of that rate, "
            f"moderate when at most half of it, and low otherwise. The side with the lower FA "
            f"is reported as affected, the level of the peak is named from its MNI height "
            f"(both levels when it lies within {fmt_num(BOUNDARY_MARGIN_MM)} mm of the "
            f"boundary between them), and a whole-tract |AI| ≥ "
            f"{val('localization', 'tract_ai')} is reported as notable. The smallest "
            f"detectable FA drop at a level is the relative drop of one side's FA, over the "
            f"best-measured window of the narrowest width lying wholly in that level, whose "
            f"AI would reach the threshold.")
        mirror = lookup(metrics, "localization", "mirrored_asymmetry")
        if isinstance(mirror, dict):
            sentences.append(
                "A second test, independent of the streamlines, looked for a focal drop of "
                "FA voxel by voxel: in template space, the FA of every voxel of the CST volume "
                "was compared with that of its mirror image across the midline (AI per voxel, "
                "in the spirit of differential tractography, Yeh et al. 2019), less the mean "
                "and over the SD of healthy scans at that voxel, the SD scaled by this scan's "
                "own mirrored asymmetry in the white matter outside the CST; the mean z over "
                "6 mm boxes gave the statistic, and its threshold is the quantile of its "
                "healthy distribution (a Gumbel law fitted on healthy volunteers, each judged "
                "by a model learned without them) for a "
                f"{escape(rate_words(mirror.get('false_positive_rate')))} chance of a finding "
                "on a healthy scan. A finding of either test is reported; the tract profile's "
                "takes precedence.")
    else:
        sentences.append(
            f"Upper-motor-neuron damage was localised from the FA asymmetry index AI = "
            f"(FA<sub>L</sub> − FA<sub>R</sub>) / (FA<sub>L</sub> + FA<sub>R</sub>): a finding "
            f"needs at least {val('localization', 'min_nodes')} consecutive nodes of one sign "
            f"with |AI| ≥ {val('localization', 'node_ai')} whose mean |AI| is at least "
            f"{val('localization', 'segment_mean_ai')}, the first and last "
            f"{val('localization', 'end_nodes')} nodes being left out; the side with the lower "
            f"FA is reported as affected, and a whole-tract |AI| ≥ "
            f"{val('localization', 'tract_ai')} is reported as notable.")
    cutoff_note = (
        " (this default is cited to both papers but has not yet been checked against their "
        "text; the 2012 algorithm may use another value)"
        if as_float(lookup(params, "prognosis", "prep_plic_ai")) == prognosis.DEFAULT_PREP_PLIC_AI
        else "")
    sentences.append(
        f"The prognosis statement follows the imaging step of the PREP algorithm (Stinear et "
        f"al. 2007; Stinear et al. 2012) with a PLIC FA asymmetry cut-off of "
        f"{val('prognosis', 'prep_plic_ai')}{cutoff_note}, and requires the patient's "
        f"motor-evoked-potential status to be applied.")
    if isinstance(params.get("qc"), dict):
        sentences.append(
            f"A CST was reported as not assessable when it had fewer than "
            f"{val('qc', 'min_streamlines')} streamlines, when less than "
            f"{pct('qc', 'min_roi_coverage')} of a CST ROI (of each cerebral peduncle: "
            f"{pct('qc', 'min_brainstem_coverage')}) was in the field of view, or when "
            f"the FA correlation with the template was below "
            f"{val('qc', 'min_template_correlation')}.")
    versions = [ver(k, label) for k, label in (
        ("cst-integrity", "cst-integrity"), ("dipy", "DIPY"), ("nibabel", "NiBabel"),
        ("numpy", "NumPy"), ("scipy", "SciPy"), ("nipype", "Nipype"), ("python", "Python"))
        if software.get(k)]
    if lookup(choice, "csd_kind") == "msmt" and software.get("cvxpy"):
        versions.insert(-1, f"cvxpy {escape(software['cvxpy'])}")
    if not software.get("cst-integrity"):
        versions.insert(0, f"cst-integrity {escape(__version__)}")
    sentences.append("Software: " + ", ".join(versions) + ".")
    if not params:
        sentences.append("<i>No run parameters are recorded in the metrics: the values above "
                         "marked “not recorded” are unknown.</i>")
    return Markup(" ".join(sentences))


def _msmt_words(choice, software) -> str:
    """The Methods sentence of multi-shell multi-tissue CSD (``qc.tracking.model_choice``)."""
    def listed(key):
        values = choice.get(key)
        return (", ".join(escape(fmt_value(v)) for v in values)
                if isinstance(values, list) and values else "(not recorded)")

    solver = f"cvxpy {escape(software['cvxpy'])}" if software.get("cvxpy") else "cvxpy"
    return (
        f"Fibre orientation distributions were estimated by multi-shell multi-tissue "
        f"constrained spherical deconvolution (Jeurissen et al., NeuroImage 2014; DIPY, quadratic "
        f"programmes solved with {solver}) of order "
        f"{escape(fmt_value(choice.get('sh_order')))} on the b = {listed('shells')} s/mm² "
        f"shells ({listed('directions_per_shell')} directions) and "
        f"{escape(fmt_value(choice.get('n_b0')))} b0 volumes, with white-matter, grey-matter "
        f"and CSF responses from the data (from "
        f"{escape(fmt_value(choice.get('n_response_voxels')))}, "
        f"{escape(fmt_value(choice.get('n_response_voxels_gm')))} and "
        f"{escape(fmt_value(choice.get('n_response_voxels_csf')))} voxels chosen by the "
        f"tensor's FA and MD).")


def tracking_model_used(metrics):
    """The model the tracking used (``csd`` or ``dti``), None when not recorded."""
    return lookup(metrics, "qc", "tracking", "model_choice", "model")


def displayed_parameters(metrics, params) -> dict:
    """The run's parameters as the table shows them: ``tracking.direction`` (the CSD
    getter, probabilistic or deterministic) only applies to CSD, so a tensor run shows how
    it tracked instead of a setting it did not use."""
    tracking = params.get("tracking")
    if not isinstance(tracking, dict) or "direction" not in tracking:
        return params
    used = tracking_model_used(metrics) or (tracking.get("model")
                                             if tracking.get("model") != "auto" else None)
    if used in (None, "csd"):
        return params
    return {**params, "tracking": {**tracking, "direction": (
        f"deterministic (tensor; --direction {tracking['direction']} applies to CSD only)")}}
