"""Which streamlines are the CST: the search box of the tract, its waypoint ROIs from the
lowest brainstem landmark both sides follow, orientation from the brainstem up, clipping
at one height on both sides and outlier cleaning.

All streamlines are in world RAS+ millimetres.
"""

import numpy as np
from dipy.tracking.streamline import Streamlines
from dipy.tracking.utils import length
from nibabel.affines import apply_affine

import atlases

from ..cst import CONTRALATERAL_EXCLUDED, CST_WAYPOINTS, HEMI, SIDES, other_side
from ..tractometry.profiles import core_mahalanobis, resample_bundle

#: Fraction of a side's streamlines that must reach down to the height where profiles start.
START_REACH_FRACTION = 0.8


#: Margin (mm) around the CST ROIs of both sides inside which CSD is fitted.
CSD_BOX_MARGIN_MM = 10.0


def cst_search_box(rois, affine, margin_mm=CSD_BOX_MARGIN_MM):
    """Boolean grid of the box around all CST ROIs (both sides), grown by ``margin_mm``.

    A CST streamline runs from the brainstem ROI to the motor target, so it stays
    in this box; fitting fibre ODFs outside it would only cost time.
    """
    inside = np.argwhere(rois > 0)
    box = np.zeros(rois.shape, dtype=bool)
    if len(inside) == 0:
        return box
    margin = np.ceil(margin_mm / np.linalg.norm(affine[:3, :3], axis=0)).astype(int)
    low = np.maximum(inside.min(axis=0) - margin, 0)
    high = np.minimum(inside.max(axis=0) + margin + 1, rois.shape)
    box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return box



#: A lower landmark is used when each side keeps at least this fraction of the streamlines
#: that reach the next landmark up, so that both bundles stay well sampled and a level
#: clipped by the field of view on one side does not cost that side its tract. Measured
#: with tensor tracking: a pons keeps 39-53 % of the peduncle's streamlines; a medulla
#: scanned whole only 13-30 % of the pons's (sub-philips02, sub-toshiba01: tensor
#: streamlines thin out there), cut by the field of view on one side 1.5-7 %. At 10 % the
#: medulla bundles of sub-toshiba01 (91-142 streamlines) started 6.6 mm apart in MNI height
#: and differed by 0.018 in mean FA between the scan and its x-flipped copy; at 30 % they
#: start in the lower pons, as stable as before.
LANDMARK_KEEP_FRACTION = 0.3


def candidate_waypoints(coverage, min_coverage):
    """The CST's waypoint chains to try, from the lowest brainstem ROI scanned on both sides.

    Each chain runs from a brainstem landmark up to the motor target: medulla, pons
    and peduncle as far as their ROIs are covered on both sides (the peduncle
    chain always comes last).
    """
    chains = []
    for lowest in ("medulla", "pons"):
        if chains or all(coverage.get(f"{lowest}_{HEMI[s]}", 0) >= min_coverage for s in SIDES):
            chains.append(CST_WAYPOINTS[CST_WAYPOINTS.index(lowest):])
    return chains + [CST_WAYPOINTS[CST_WAYPOINTS.index("peduncle"):]]


def select_cst(streamlines, rois, affine, waypoints):
    """Per side, the streamlines through all of its own waypoints that touch none of the
    other side's :data:`pipeline.cst.CONTRALATERAL_EXCLUDED` ROIs."""
    labels = atlases.CST_ROI_LABELS
    selected = {}
    for side in SIDES:
        h, other = HEMI[side], HEMI[other_side(side)]
        selected[side] = select_tract(
            streamlines, rois, affine, required=[labels[f"{r}_{h}"] for r in waypoints],
            forbidden=[labels[f"{r}_{other}"] for r in CONTRALATERAL_EXCLUDED])
    return selected


def lowest_kept_landmark(streamlines, rois, affine, chains):
    """The lowest waypoint chain that each side follows with enough streamlines.

    Returns (waypoints, selected streamlines per side, streamline counts per tried
    landmark for the QC).
    """
    selections = [select_cst(streamlines, rois, affine, chain) for chain in chains]
    counts = {chain[0]: {s: len(sel[s]) for s in SIDES} for chain, sel in zip(chains, selections)}
    for i, (chain, selected) in enumerate(zip(chains, selections)):
        upper = selections[i + 1] if i + 1 < len(chains) else None
        if upper is None or all(len(selected[s]) >= LANDMARK_KEEP_FRACTION * len(upper[s])
                                for s in SIDES):
            return chain, selected, counts


def labels_along(points, labels, affine, *, fill=0):
    """Value of an image (labels, or any map) at each world-mm point (nearest voxel;
    ``fill`` outside the grid)."""
    ijk = np.rint(apply_affine(np.linalg.inv(affine), points)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape)), axis=1)
    values = np.full(len(points), fill, dtype=np.result_type(labels.dtype, fill))
    values[inside] = labels[tuple(ijk[inside].T)]
    return values


def _labels_per_streamline(streamlines, labels, affine, *, fill=0):
    """Labels along all streamlines at once: (values of all points, start offsets)."""
    lengths = np.array([len(s) for s in streamlines])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return labels_along(np.concatenate(streamlines), labels, affine, fill=fill), offsets


def select_tract(streamlines, labels, affine, *, required, forbidden):
    """Streamlines that pass every label in ``required`` and touch none in ``forbidden``."""
    if len(streamlines) == 0:
        return []
    values, offsets = _labels_per_streamline(streamlines, labels, affine)
    keep = np.ones(len(streamlines), dtype=bool)
    for value in required:
        keep &= np.logical_or.reduceat(values == value, offsets)
    for value in forbidden:
        keep &= ~np.logical_or.reduceat(values == value, offsets)
    return [s for s, k in zip(streamlines, keep) if k]


def heights_along(streamlines, height_map, affine):
    """The height map (e.g. MNI z, mm) at every point of every streamline (nearest voxel;
    NaN outside the grid): one array per streamline."""
    if len(streamlines) == 0:
        return []
    values, offsets = _labels_per_streamline(streamlines, height_map, affine, fill=np.nan)
    return np.split(values, offsets[1:])


def orient_inferior_first(streamlines, heights):
    """Flip streamlines (and their heights) so that each starts at its anatomically
    inferior end: the end with the lower height (MNI z), not world z, which a tilted
    or side-lying head turns. Returns (streamlines, heights)."""
    oriented, oriented_heights = [], []
    for s, h in zip(streamlines, heights):
        flip = np.nan_to_num(h[0], nan=np.inf) > np.nan_to_num(h[-1], nan=np.inf)
        oriented.append(s[::-1].copy() if flip else s)
        oriented_heights.append(h[::-1] if flip else h)
    return oriented, oriented_heights


def common_start_height(heights_by_side, *, floor, reach_fraction=START_REACH_FRACTION):
    """The lowest height (mm) that both sides' bundles reach: where both profiles start.

    It is the highest of ``floor`` (the landmark's lowest anatomical height) and,
    for each side, the height that ``reach_fraction`` of its streamlines reach
    down to, so that node 0 lies at one anatomical height on both sides, and the
    same one on every scan that covers the landmark, instead of wherever each
    streamline happened to stop. NaN when a side has no streamline.
    """
    start = float(floor)
    for heights in heights_by_side:
        lowest = [np.nanmin(h) for h in heights if np.isfinite(h).any()]
        if not lowest:
            return float("nan")
        start = max(start, float(np.quantile(lowest, reach_fraction)))
    return start


def clip_from_height(streamlines, heights, labels, affine, *, start_height, upper):
    """Keep the part of each (inferior-first) streamline from the point where it
    crosses ``start_height`` upwards to its first point in the ``upper`` ROI after that.

    Streamlines that do not reach down to ``start_height`` or do not enter
    ``upper`` above it are dropped. Clipping both sides at one height and one
    target ROI makes their profiles comparable node by node.
    """
    if len(streamlines) == 0 or not np.isfinite(start_height):
        return []
    all_values, offsets = _labels_per_streamline(streamlines, labels, affine)
    clipped = []
    for s, h, values in zip(streamlines, heights, np.split(all_values, offsets[1:])):
        below = np.flatnonzero(h <= start_height)
        if len(below) == 0:
            continue
        start = below[-1] + 1 if below[-1] + 1 < len(s) else below[-1]
        in_upper = np.flatnonzero(values[start:] == upper)
        if len(in_upper) == 0:
            continue
        stop = start + in_upper[0]
        if stop - start >= 3:
            clipped.append(np.ascontiguousarray(s[start:stop + 1]))
    return clipped


def clean_bundle(streamlines, *, n_points=100, distance_threshold=3.0, length_threshold=4.0,
                 max_rounds=5, min_streamlines=20):
    """Remove outlier streamlines (pyAFQ-style): far from the bundle core or of odd length.

    A streamline goes when, at any of ``n_points`` nodes, its Mahalanobis distance
    to the core exceeds ``distance_threshold``, or its length z-score exceeds
    ``length_threshold``. Stops early rather than leave fewer than ``min_streamlines``.
    """
    bundle = list(streamlines)
    if len(bundle) < min_streamlines:
        return bundle
    for _ in range(max_rounds):
        distance = core_mahalanobis(resample_bundle(bundle, n_points))
        lengths = np.asarray(list(length(Streamlines(bundle))))
        length_z = np.abs(lengths - lengths.mean()) / (lengths.std() or 1.0)
        keep = (np.all(np.nan_to_num(distance) < distance_threshold, axis=1)
                & (length_z < length_threshold))
        if keep.all() or keep.sum() < min_streamlines:
            break
        bundle = [s for s, k in zip(bundle, keep) if k]
    return bundle
