"""Where does upper-motor-neuron damage show along the CST?

A finding needs a left-right FA asymmetry beyond what healthy subjects show
(|AI| of a few hundredths, more in crossing regions) that persists over
several consecutive profile nodes. On the healthy scans of ../shared/data the
strongest such run (corona radiata, where the CST crosses other bundles) had a
mean |AI| of 0.15 over 8 nodes; a focal FA drop of 50 % gives about 0.3. Until
normative profiles are available, a segment must therefore reach a mean |AI| of
0.20.
"""

import numpy as np

#: Defaults, all overridable from the command line.
DEFAULT_THRESHOLDS = {
    "node_ai": 0.10,   # |AI| at a node to count as asymmetric
    "min_nodes": 6,    # consecutive asymmetric nodes (same sign) for a segment
    "segment_mean_ai": 0.20,  # mean |AI| over the segment for a finding
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


def _confidence(mean_abs_ai, n_nodes, thresholds):
    strong = mean_abs_ai >= 1.5 * thresholds["segment_mean_ai"]
    long_ = n_nodes >= 2 * thresholds["min_nodes"]
    return "high" if strong and long_ else "moderate" if strong or long_ else "low"


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
    ai = np.asarray(ai_profile, dtype=float)
    segments = []
    for start, end, sign in asymmetric_segments(ai, node_ai=thresholds["node_ai"],
                                                min_nodes=thresholds["min_nodes"],
                                                end_nodes=thresholds["end_nodes"]):
        nodes = np.arange(start, end + 1)
        mean_abs = float(np.nanmean(np.abs(ai[nodes])))
        if mean_abs < thresholds["segment_mean_ai"]:
            continue
        side = "right" if sign > 0 else "left"  # the side with the lower FA
        peak = int(nodes[np.nanargmax(np.abs(ai[nodes]))])
        levels = node_levels[side]
        segments.append({
            "side": side, "start_node": int(start), "end_node": int(end), "peak_node": peak,
            "start_level": levels[start], "end_level": levels[end], "peak_level": levels[peak],
            "peak_ras_mm": [round(float(v), 1) for v in node_xyz[side][peak]],
            "peak_ai": round(float(ai[peak]), 4),
            "mean_ai": round(float(np.nanmean(ai[nodes])), 4),
            "summed_abs_ai": round(float(np.nansum(np.abs(ai[nodes]))), 4),
            "confidence": _confidence(mean_abs, len(nodes), thresholds),
        })
    result["segments"] = segments
    if segments:
        primary = max(segments, key=lambda s: s["summed_abs_ai"])
        result.update(umn_damage=True, affected_side=primary["side"], level=primary["peak_level"],
                      peak_ras_mm=primary["peak_ras_mm"], peak_node=primary["peak_node"],
                      confidence=primary["confidence"])
    return result
