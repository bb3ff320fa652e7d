"""Where does upper-motor-neuron damage show along the CST?

Two detection rules, one verdict each:

``calibrated`` (default)
    Calibrated to the scan itself. The bootstrap of the profiles
    (:mod:`pipeline.tractometry.uncertainty`) gives the scan's own uncertainty of the
    asymmetry index AI at every node; a model of healthy asymmetry (the
    left-right differences healthy CSTs show beyond that noise, per level,
    learned from healthy real runs: :data:`HEALTHY_ASYMMETRY`) adds what anatomy
    and registration contribute. The mean AI over every window of a few
    consecutive nodes is divided by its standard error from both sources, and a
    finding needs the largest such |t| to exceed the threshold that healthy
    profiles of this very scan (bootstrap noise plus healthy asymmetry, drawn
    ``null_draws`` times) exceed with probability ``false_positive_rate``: the
    rate of false findings per scan is calibrated, not assumed.
``fixed-ai``
    The earlier rule: a run of ≥ ``min_nodes`` consecutive nodes with |AI| ≥
    ``node_ai`` of one sign whose mean |AI| reaches ``segment_mean_ai``, with
    ``end_nodes`` left out at each end. Its thresholds were set on the research
    scans of ../shared/data/bids and do not carry over to noisier protocols.

With ``calibrated``, a second rule looks for a focal drop of FA voxel by voxel,
independently of the streamlines: the mirrored FA asymmetry inside the CST volume
(:mod:`pipeline.tractometry.mirrored`), calibrated at its own
``mirrored_false_positive_rate``. A finding of either rule is a finding (the
verdict's false-positive rate is at most the sum of both); the profile rule's takes
precedence, and ``detected_by`` names the rules that found damage.

With control participants, the group level compares every other run with their
per-node norms as well (:mod:`pipeline.tractometry.normative`).
"""

import json
from pathlib import Path

import numpy as np

import atlases

from . import mirrored

#: Defaults, all overridable from the command line.
DEFAULT_THRESHOLDS = {
    "method": "calibrated",
    # calibrated: per-scan false-finding rate, window widths (nodes), draws of the null
    "false_positive_rate": 0.01,
    "window_nodes": [6, 12],
    "null_draws": 2000,
    # fixed-ai:
    "node_ai": 0.10,   # |AI| at a node to count as asymmetric
    "min_nodes": 6,    # consecutive asymmetric nodes (same sign) for a segment
    "segment_mean_ai": 0.12,  # mean |AI| over the segment for a finding
    # Nodes at each end left out of the fixed rule: streamlines fan out and meet grey
    # matter (cortical end) or end at the landmark ROI (brainstem end), so the
    # healthy left-right difference is large there. The calibrated rule uses every
    # node: its healthy-asymmetry model and bootstrap carry that spread instead.
    "end_nodes": 10,
    "tract_ai": 0.05,  # |whole-tract AI| reported as notable (both rules)
    # calibrated: the mirrored-asymmetry rule's own rate of findings on healthy scans
    "mirrored_false_positive_rate": 0.01,
}

LEVELS = ("medulla", "pons", "cerebral_peduncle", "internal_capsule", "corona_radiata", "cortex")

#: Healthy left-right asymmetry beyond the bootstrap's noise: per-level SD of AI and the
#: correlation of neighbouring nodes, learned by ``scripts/fit_healthy_asymmetry.py``.
HEALTHY_ASYMMETRY_FILE = Path(__file__).with_name("healthy_asymmetry.json")


def load_healthy_asymmetry(path=HEALTHY_ASYMMETRY_FILE):
    """The healthy-asymmetry model: ``{"sd_by_level": {level: SD}, "sd_default": SD,
    "node_correlation": rho, ...provenance}``."""
    return json.loads(Path(path).read_text())


# Part of the settings, so that a refitted model is recorded in every output's
# provenance and invalidates the cached assessment.
DEFAULT_THRESHOLDS["healthy_model"] = load_healthy_asymmetry()
DEFAULT_THRESHOLDS["mirrored_model"] = mirrored.load_model_summary()


def window_means(profiles, width):
    """Mean over every window of ``width`` consecutive nodes: (..., n_nodes - width + 1)."""
    profiles = np.asarray(profiles, dtype=float)
    cumulative = np.cumsum(np.concatenate([np.zeros(profiles.shape[:-1] + (1,)), profiles],
                                          axis=-1), axis=-1)
    return (cumulative[..., width:] - cumulative[..., :-width]) / width


def healthy_covariance(sd, correlation):
    """Covariance of healthy AI over the nodes: SDs ``sd`` (n_nodes,), and neighbouring
    nodes correlated as an AR(1) process with lag-one correlation ``correlation``."""
    lags = np.abs(np.subtract.outer(np.arange(len(sd)), np.arange(len(sd))))
    return np.outer(sd, sd) * float(correlation) ** lags


def _window_operator(n_nodes, width):
    """Rows average the windows of ``width`` nodes: (n_nodes - width + 1, n_nodes)."""
    rows = np.arange(n_nodes - width + 1)
    operator = np.zeros((len(rows), n_nodes))
    for k in range(width):
        operator[rows, rows + k] = 1.0 / width
    return operator


def window_t(ai, noise_replicates, healthy_cov, widths):
    """Window t statistics of an AI profile, and a function giving those of other profiles.

    Parameters
    ----------
    ai : (n_nodes,) observed asymmetry index
    noise_replicates : (B, n_nodes) bootstrap replicates of ``ai``
    healthy_cov : (n_nodes, n_nodes) :func:`healthy_covariance`
    widths : sequence of int

    Returns
    -------
    t : dict width -> (n_windows,) mean AI over the window / its SE (bootstrap
        variance of the window mean plus the healthy variance)
    se : dict width -> (n_windows,) those standard errors
    statistic : callable mapping profiles (K, n_nodes) to the same t, (K, windows)
        per width, with this scan's standard errors
    """
    n_nodes = len(ai)
    operators = {w: _window_operator(n_nodes, w) for w in widths}
    se = {}
    for w, operator in operators.items():
        boot_var = np.nanvar(window_means(noise_replicates, w), axis=0)
        healthy_var = np.sum((operator @ healthy_cov) * operator, axis=1)
        se[w] = np.sqrt(boot_var + healthy_var)

    def statistic(profiles):
        return {w: window_means(profiles, w) / se[w] for w in widths}

    return statistic(np.asarray(ai, dtype=float)), se, statistic


def max_abs_t(t_by_width):
    """The largest |t| over every window of every width, per profile (NaN windows ignored)."""
    return np.nanmax(np.concatenate([np.abs(t) for t in t_by_width.values()], axis=-1),
                     axis=-1)


def null_max_t(noise_replicates, healthy_cov, statistic, *, n_draws, random_seed=0):
    """Largest window |t| of ``n_draws`` healthy profiles of this scan.

    Each is a bootstrap deviation (a replicate minus the replicates' mean: this
    scan's measurement and sampling noise) plus a draw of healthy asymmetry
    (Gaussian, ``healthy_cov``). Its upper quantile is the detection threshold.
    """
    rng = np.random.default_rng(random_seed)
    noise = noise_replicates - np.nanmean(noise_replicates, axis=0)
    picks = noise[rng.integers(0, len(noise), n_draws)]
    # Jitter: a model SD of 0 at some node leaves the covariance only semi-definite.
    factor = np.linalg.cholesky(healthy_cov + 1e-12 * np.eye(len(healthy_cov)))
    healthy = rng.standard_normal((n_draws, len(healthy_cov))) @ factor.T
    return max_abs_t(statistic(np.nan_to_num(picks) + healthy))


def calibrated_segments(ai, t_by_width, threshold, node_levels, node_xyz):
    """Segments where window |t| reaches ``threshold``: overlapping windows of one sign
    merged; keys as :func:`deviation_segments` plus ``peak_t``.
    """
    n_nodes = len(ai)
    best_t = np.zeros(n_nodes)  # the |t| of the strongest window covering each node, signed
    for w, t in t_by_width.items():
        for start in np.flatnonzero(np.abs(np.nan_to_num(t)) >= threshold):
            span = slice(start, start + w)
            stronger = np.abs(t[start]) > np.abs(best_t[span])
            best_t[span] = np.where(stronger, t[start], best_t[span])
    sign = np.sign(best_t).astype(int)
    segments = []
    for start, end, seg_sign in asymmetric_segments(sign, node_ai=1, min_nodes=1):
        nodes = np.arange(start, end + 1)
        side = "right" if seg_sign > 0 else "left"  # the side with the lower FA
        peak = int(nodes[np.nanargmax(np.abs(np.nan_to_num(ai[nodes])))])
        levels = node_levels[side]
        segments.append({
            "side": side, "start_node": int(start), "end_node": int(end), "peak_node": peak,
            "start_level": levels[start], "end_level": levels[end], "peak_level": levels[peak],
            "peak_ras_mm": [round(float(v), 1) for v in node_xyz[side][peak]],
            "peak_ai": round(float(ai[peak]), 4), "mean_ai": round(float(np.nanmean(ai[nodes])), 4),
            "summed_abs_ai": round(float(np.nansum(np.abs(ai[nodes]))), 4),
            "peak_t": round(float(best_t[nodes][np.argmax(np.abs(best_t[nodes]))]), 2),
        })
    return segments


def detectable_fa_drop(se_by_width, node_levels, threshold, *, side="left"):
    """Per level, the smallest drop of one side's FA profile (fraction) this scan could detect.

    A relative drop d of one side's FA over a window gives a window AI of
    about d / (2 - d) (from no asymmetry); it is found when that reaches
    ``threshold`` standard errors. The best window of the narrowest width lying
    wholly in the level counts; a level too short for one window is left out.
    """
    width = min(se_by_width)
    se = se_by_width[width]
    levels = node_levels[side]
    drops = {}
    for level in dict.fromkeys(lv for lv in levels if lv):
        inside = [k for k in range(len(se))
                  if all(levels[k + j] == level for j in range(width)) and np.isfinite(se[k])]
        if inside:
            x = threshold * float(np.min(se[inside]))
            drops[level] = round(2 * x / (1 + x), 3)
    return drops


def _confidence_from_p(p_value, rate):
    return "high" if p_value <= rate / 10 else "moderate" if p_value <= rate / 2 else "low"


def asymmetric_segments(ai_profile, *, node_ai, min_nodes, end_nodes=0):
    """Runs of ≥ ``min_nodes`` consecutive nodes with |AI| ≥ ``node_ai`` and one sign.

    The first and last ``end_nodes`` nodes are not considered.

    Returns
    -------
    list of (start, end, sign) with ``end`` inclusive; sign +1 means FA left > right.
    """
    ai = np.nan_to_num(np.asarray(ai_profile, dtype=float), nan=0.0)
    if end_nodes:
        ai[:end_nodes] = 0.0
        ai[-end_nodes:] = 0.0
    sign = np.where(ai >= node_ai, 1, np.where(ai <= -node_ai, -1, 0))
    segments = []
    start = None
    for i in range(len(sign) + 1):
        current = sign[i] if i < len(sign) else 0
        if start is not None and current != sign[start]:
            if i - start >= min_nodes:
                segments.append((start, i - 1, int(sign[start])))
            start = None
        if start is None and current != 0:
            start = i
    return segments


def _confidence(mean_abs, n_nodes, segment_mean, min_nodes):
    strong = mean_abs >= 1.5 * segment_mean
    long_ = n_nodes >= 2 * min_nodes
    return "high" if strong and long_ else "moderate" if strong or long_ else "low"


def deviation_segments(profile, node_levels, node_xyz, *, node_threshold, min_nodes,
                       segment_mean, end_nodes=0, statistic="ai"):
    """Segments of a signed left-versus-right deviation profile that make a finding.

    Parameters
    ----------
    profile : (n_nodes,) signed deviation, positive where left FA is the higher:
        the asymmetry index itself, or its single-case t against controls
        (:mod:`pipeline.tractometry.normative`).
    node_levels, node_xyz : per side, as in :func:`localize_damage`.
    node_threshold, min_nodes, end_nodes : see :func:`asymmetric_segments`.
    segment_mean : float
        Mean |profile| a segment must reach.
    statistic : str
        Name of the profile's statistic in the segment keys (``peak_<statistic>``,
        ``mean_<statistic>``, ``summed_abs_<statistic>``).

    Returns
    -------
    list of dict, one per segment: the side with the lower FA, nodes, levels,
    peak position (RAS mm), peak/mean/summed values and a confidence.
    """
    values = np.asarray(profile, dtype=float)
    segments = []
    for start, end, sign in asymmetric_segments(values, node_ai=node_threshold,
                                                min_nodes=min_nodes, end_nodes=end_nodes):
        nodes = np.arange(start, end + 1)
        mean_abs = float(np.nanmean(np.abs(values[nodes])))
        if mean_abs < segment_mean:
            continue
        side = "right" if sign > 0 else "left"  # the side with the lower FA
        peak = int(nodes[np.nanargmax(np.abs(values[nodes]))])
        levels = node_levels[side]
        segments.append({
            "side": side, "start_node": int(start), "end_node": int(end), "peak_node": peak,
            "start_level": levels[start], "end_level": levels[end], "peak_level": levels[peak],
            "peak_ras_mm": [round(float(v), 1) for v in node_xyz[side][peak]],
            f"peak_{statistic}": round(float(values[peak]), 4),
            f"mean_{statistic}": round(float(np.nanmean(values[nodes])), 4),
            f"summed_abs_{statistic}": round(float(np.nansum(np.abs(values[nodes]))), 4),
            "confidence": _confidence(mean_abs, len(nodes), segment_mean, min_nodes),
        })
    return segments


def primary_finding(segments, statistic="ai"):
    """The finding of the segment with the largest summed |statistic| (``None`` without any)."""
    if not segments:
        return None
    primary = max(segments, key=lambda s: s[f"summed_abs_{statistic}"])
    return {"umn_damage": True, "affected_side": primary["side"], "level": primary["peak_level"],
            "peak_ras_mm": primary["peak_ras_mm"], "peak_node": primary["peak_node"],
            "confidence": primary["confidence"]}


def localize_damage(ai_profile, node_levels, node_xyz, *, thresholds=None, assessable=True,
                    ai_bootstrap=None, node_mni_z=None):
    """Turn the FA asymmetry profile into a localisation statement.

    Parameters
    ----------
    ai_profile : (n_nodes,) AI = (FA_L − FA_R)/(FA_L + FA_R)
    node_levels : dict side → list of level names per node (``None`` where unknown)
    node_xyz : dict side → (n_nodes, 3) world RAS mm positions of the nodes
    thresholds : dict, see :data:`DEFAULT_THRESHOLDS`; ``method`` chooses the rule,
        ``healthy_model`` is the calibrated rule's :func:`load_healthy_asymmetry`
    assessable : bool
        False when QC found the CST could not be assessed: then no claim is made.
    ai_bootstrap : (B, n_nodes), optional
        Bootstrap replicates of ``ai_profile`` (:mod:`pipeline.tractometry.uncertainty`);
        needed by the calibrated rule.
    node_mni_z : dict side → (n_nodes,) MNI heights (mm) of the nodes, optional
        With them, a peak within :data:`BOUNDARY_MARGIN_MM` of a level boundary
        names both levels (``levels_near_boundary``).

    Returns
    -------
    dict with ``assessable, umn_damage, affected_side, level, peak_ras_mm,
    peak_node, confidence, segments, thresholds``, and for the calibrated rule
    ``statistic`` (value, threshold, p_value, false_positive_rate) and
    ``detectable_fa_drop`` (level → smallest detectable relative drop of one
    side's FA profile), ``levels_near_boundary``, ``detected_by`` (``["profile"]``
    with a finding, else ``[]``) and ``mirrored_asymmetry`` (None: the stage adds it
    with :func:`with_mirrored_finding`). The primary finding is the
    segment with the largest summed |AI| (fixed rule) or |t| (calibrated); the side
    with the lower FA is the affected side.
    """
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    result = {"assessable": bool(assessable), "umn_damage": False, "affected_side": "none",
              "level": None, "peak_ras_mm": None, "peak_node": None, "confidence": None,
              "segments": [], "thresholds": thresholds, "statistic": None,
              "detectable_fa_drop": None, "levels_near_boundary": None,
              "detected_by": None, "mirrored_asymmetry": None}
    if not assessable:
        # No claim either way: whether there is damage, and where, is unknown (JSON null),
        # which "umn_damage": false / "affected_side": "none" would misstate as normal.
        result.update(umn_damage=None, affected_side=None, level=None, peak_ras_mm=None,
                      peak_node=None, confidence=None, segments=[])
        return result
    if thresholds["method"] == "fixed-ai":
        segments = deviation_segments(ai_profile, node_levels, node_xyz,
                                      node_threshold=thresholds["node_ai"],
                                      min_nodes=thresholds["min_nodes"],
                                      segment_mean=thresholds["segment_mean_ai"],
                                      end_nodes=thresholds["end_nodes"])
        result["segments"] = segments
        result.update(primary_finding(segments) or {})
    elif ai_bootstrap is None:
        raise ValueError("the calibrated rule needs the bootstrap replicates of the profile")
    else:
        result.update(calibrated_finding(ai_profile, ai_bootstrap, node_levels, node_xyz,
                                         healthy_model=thresholds["healthy_model"],
                                         false_positive_rate=thresholds["false_positive_rate"],
                                         window_nodes=thresholds["window_nodes"],
                                         null_draws=thresholds["null_draws"]))
    result["detected_by"] = ["profile"] if result["umn_damage"] else []
    return _with_boundary_levels(result, node_mni_z)


def localize_profiles(profiles, *, thresholds=None, assessable=True):
    """:func:`localize_damage` on a run's profiles as ``steps.tract_profiles`` keeps them
    (its ``profiles.json``: the AI profile with None where undefined, node levels,
    positions and MNI heights per side, and the bootstrap replicates)."""
    ai = np.array([np.nan if v is None else v for v in profiles["fa_ai_profile"]], dtype=float)
    return localize_damage(ai, profiles["node_levels"],
                           {side: np.asarray(xyz) for side, xyz in profiles["node_xyz"].items()},
                           thresholds=thresholds, assessable=assessable,
                           ai_bootstrap=profiles.get("fa_ai_bootstrap"),
                           node_mni_z=profiles.get("node_mni_z"))


#: A peak this close (mm, MNI z) to a level boundary names the levels on both sides of it:
#: the registration and the subject's anatomy do not place a boundary more exactly.
BOUNDARY_MARGIN_MM = 3.0


def levels_near_height(z, z_ranges, margin_mm=BOUNDARY_MARGIN_MM):
    """The levels whose band lies within ``margin_mm`` of height ``z`` (mm), bottom up."""
    return [name for name, (low, high) in z_ranges.items()
            if low - margin_mm <= z < high + margin_mm]


def _with_boundary_levels(result, node_mni_z):
    """Add ``levels_near_boundary`` for the finding's peak when its MNI height is known."""
    if not result.get("umn_damage") or node_mni_z is None:
        return result
    z = node_mni_z[result["affected_side"]][result["peak_node"]]
    if z is not None and np.isfinite(z):
        result["levels_near_boundary"] = levels_near_height(z, atlases.LEVEL_Z_RANGES)
    return result


def node_healthy_sd(node_levels, model):
    """Healthy AI SD at each node: the model's SD for the node's level (larger of the
    two sides' levels where they differ), its default where the level is unknown."""
    by_level = model["sd_by_level"]
    return np.array([max(by_level.get(left, model["sd_default"]),
                         by_level.get(right, model["sd_default"]))
                     for left, right in zip(node_levels["left"], node_levels["right"])])


def calibrated_finding(ai_profile, ai_bootstrap, node_levels, node_xyz, *, healthy_model,
                       false_positive_rate, window_nodes, null_draws, random_seed=0):
    """The calibrated rule (module docstring): statistic, threshold, segments, finding."""
    ai = np.asarray(ai_profile, dtype=float)
    replicates = np.asarray(ai_bootstrap, dtype=float)
    healthy_cov = healthy_covariance(node_healthy_sd(node_levels, healthy_model),
                                     healthy_model["node_correlation"])
    widths = [int(w) for w in window_nodes]
    t_by_width, se_by_width, statistic = window_t(ai, replicates, healthy_cov, widths)
    null = null_max_t(replicates, healthy_cov, statistic, n_draws=int(null_draws),
                      random_seed=random_seed)
    threshold = float(np.quantile(null, 1.0 - false_positive_rate))
    observed = float(max_abs_t(t_by_width))
    p_value = float((1 + np.count_nonzero(null >= observed)) / (len(null) + 1))
    out = {"statistic": {"name": "largest |window mean AI / SE|", "value": round(observed, 3),
                         "threshold": round(threshold, 3), "p_value": round(p_value, 5),
                         "false_positive_rate": false_positive_rate,
                         "healthy_model": healthy_model.get("source")},
           "detectable_fa_drop": detectable_fa_drop(se_by_width, node_levels, threshold)}
    if observed < threshold:
        return out
    segments = calibrated_segments(ai, t_by_width, threshold, node_levels, node_xyz)
    primary = max(segments, key=lambda seg: abs(seg["peak_t"]))
    out.update(umn_damage=True, affected_side=primary["side"], level=primary["peak_level"],
               peak_ras_mm=primary["peak_ras_mm"], peak_node=primary["peak_node"],
               confidence=_confidence_from_p(p_value, false_positive_rate), segments=segments)
    return out


def with_mirrored_finding(result, mirrored_result):
    """Add the mirrored-asymmetry rule's result to a calibrated localisation.

    ``result`` gains ``mirrored_asymmetry`` (:func:`pipeline.tractometry.mirrored.
    mirrored_finding`) and ``detected_by`` (the rules that found damage:
    ``"profile"``, ``"mirrored_asymmetry"``). When only the mirrored rule found
    damage, its side, level and peak are the verdict's (``peak_node`` stays None:
    the peak is a voxel, not a profile node).
    """
    result = {**result, "mirrored_asymmetry": mirrored_result}
    detected_by = list(result["detected_by"])
    if mirrored_result["umn_damage"]:
        detected_by.append("mirrored_asymmetry")
        if not result["umn_damage"]:
            result.update(
                umn_damage=True, affected_side=mirrored_result["affected_side"],
                level=mirrored_result["level"], peak_ras_mm=mirrored_result["peak_ras_mm"],
                peak_node=None, confidence=_confidence_from_p(
                    mirrored_result["p_value"], mirrored_result["false_positive_rate"]),
                levels_near_boundary=levels_near_height(
                    mirrored_result["peak_mni_mm"][2], atlases.LEVEL_Z_RANGES))
    result["detected_by"] = detected_by
    return result
