"""Where does upper-motor-neuron damage show along the CST?

A finding needs a left-right FA asymmetry beyond what healthy subjects show
(|AI| of a few hundredths, more in crossing regions) that persists over
several consecutive profile nodes. On the healthy scans of ../shared/data
(philips01/02, siemens01, toshiba01) no node inside the detection window
exceeded |AI| 0.132 and no run of 6 nodes stayed at 0.10 or more, while a
radial-diffusivity lesion halving FA in a 6 mm sphere gave runs with a mean
|AI| of 0.13-0.29 (``scripts/validate_lesions.py``; thresholds set on the
philips02 and toshiba01 lesions, then checked on others). For a single subject
a segment must therefore reach a mean |AI| of 0.12. With control
participants, the group level compares every other run with their per-node
norms instead (:mod:`pipeline.normative`), which finds smaller focal drops.
"""

import numpy as np

#: Defaults, all overridable from the command line.
DEFAULT_THRESHOLDS = {
    "node_ai": 0.10,   # |AI| at a node to count as asymmetric
    "min_nodes": 6,    # consecutive asymmetric nodes (same sign) for a segment
    "segment_mean_ai": 0.12,  # mean |AI| over the segment for a finding
    "tract_ai": 0.05,  # |whole-tract AI| reported as notable
    # Nodes at each end left out of detection: streamlines fan out and meet grey
    # matter (cortical end) or end at the landmark ROI (brainstem end), so the
    # healthy left-right difference is large there.
    "end_nodes": 10,
}

LEVELS = ("medulla", "pons", "cerebral_peduncle", "internal_capsule", "corona_radiata", "cortex")


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
        (:mod:`pipeline.normative`).
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


def localize_damage(ai_profile, node_levels, node_xyz, *, thresholds=None, assessable=True):
    """Turn the FA asymmetry profile into a localisation statement.

    Parameters
    ----------
    ai_profile : (n_nodes,) AI = (FA_L − FA_R)/(FA_L + FA_R)
    node_levels : dict side → list of level names per node (``None`` where unknown)
    node_xyz : dict side → (n_nodes, 3) world RAS mm positions of the nodes
    thresholds : dict, see :data:`DEFAULT_THRESHOLDS`
    assessable : bool
        False when QC found the CST could not be assessed: then no claim is made.

    Returns
    -------
    dict with ``assessable, umn_damage, affected_side, level, peak_ras_mm,
    peak_node, segments, thresholds``. The primary finding is the segment with
    the largest summed |AI|; the side with the lower FA is the affected side.
    """
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    result = {"assessable": bool(assessable), "umn_damage": False, "affected_side": "none",
              "level": None, "peak_ras_mm": None, "peak_node": None, "confidence": None,
              "segments": [], "thresholds": thresholds}
    if not assessable:
        result["affected_side"] = None
        return result
    segments = deviation_segments(ai_profile, node_levels, node_xyz,
                                  node_threshold=thresholds["node_ai"],
                                  min_nodes=thresholds["min_nodes"],
                                  segment_mean=thresholds["segment_mean_ai"],
                                  end_nodes=thresholds["end_nodes"])
    result["segments"] = segments
    result.update(primary_finding(segments) or {})
    return result
