"""Figures of the tract profiles: FA, FA asymmetry and diffusivities along the CSTs."""

import math

import numpy as np
from matplotlib.figure import Figure

from ..cst import SIDES, TRACT_NAMES
from .drawing import COLORS, LEVEL_COLORS, LEVEL_SHORT, PEAK_COLOR, SEGMENT_COLOR, new_figure
from .values import as_float


def _level_runs(levels):
    """[(level, first node, last node)] runs of equal level (None kept as a run)."""
    runs = []
    for i, level in enumerate(levels):
        if runs and runs[-1][0] == level:
            runs[-1][2] = i
        else:
            runs.append([level, i, i])
    return [tuple(r) for r in runs]


def _shade_levels(ax, levels, nodes, *, alpha=0.35, annotate=True):
    if not levels:
        return
    for level, first, last in _level_runs(levels):
        if level is None:
            continue
        x0, x1 = nodes[first] - 0.5, nodes[last] + 0.5
        ax.axvspan(x0, x1, color=LEVEL_COLORS.get(level, "#eeeeee"), alpha=alpha, lw=0,
                   zorder=0)
        if annotate:
            width = x1 - x0
            label = LEVEL_SHORT.get(level, str(level).replace("_", " "))
            rotate = width < 9
            ax.text((x0 + x1) / 2, 0.985, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7, color="#333",
                    rotation=90 if rotate else 0, clip_on=True)


def _shade_segments(ax, segments, *, label=True):
    used = False
    for seg in segments or ():
        start, end = as_float(seg.get("start_node")), as_float(seg.get("end_node"))
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        ax.axvspan(start - 0.5, end + 0.5, facecolor=SEGMENT_COLOR, alpha=0.13,
                   edgecolor=SEGMENT_COLOR, hatch="///", lw=0.0, zorder=1,
                   label="detected segment" if (label and not used) else None)
        used = True
    return used


def band_levels(profiles):
    """Per-node level names for the background bands: left tract's, filled from the right."""
    left = (profiles.get("left") or {}).get("level")
    right = (profiles.get("right") or {}).get("level")
    if left is None and right is None:
        return None
    n = max(len(left or []), len(right or []))
    out = []
    for i in range(n):
        value = left[i] if left is not None and i < len(left) else None
        if value is None and right is not None and i < len(right):
            value = right[i]
        out.append(value)
    return out


def _node_axis(ax):
    ax.set_xlabel("Node (0 = inferior, brainstem  →  99 = superior, cortex)", fontsize=9)
    ax.grid(True, axis="y", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def plot_profiles(profiles, *, metric="fa", segments=(), peak_node=None, ylabel=None,
                  title=None) -> Figure:
    """Left vs right profile of one metric along the nodes, level bands and segments shaded.

    ``profiles`` is :func:`read_profiles_tsv`'s dict (side → columns).
    """
    fig = new_figure(8.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    levels = band_levels(profiles)
    n_nodes = 100
    for side in SIDES:
        prof = profiles.get(side)
        if prof is None or metric not in prof:
            continue
        values = np.asarray(prof[metric], dtype=float)
        n_nodes = max(n_nodes, len(values))
        ax.plot(prof["node"], values, color=COLORS[side], lw=2.0,
                label=f"{TRACT_NAMES[side]} ({side})")
    nodes = np.arange(n_nodes)
    if levels:
        _shade_levels(ax, levels, nodes)
    _shade_segments(ax, segments)
    if peak_node is not None and math.isfinite(as_float(peak_node)):
        ax.axvline(as_float(peak_node), color=PEAK_COLOR, lw=1.2, ls="--", label="peak node")
    ax.set_xlim(-0.5, n_nodes - 0.5)
    ax.set_ylabel(ylabel or metric.upper())
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + (hi - lo) * 0.18)  # room for level names
    _node_axis(ax)
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _shade_ignored_ends(ax, n_nodes, end_nodes):
    """Grey the ``end_nodes`` nodes at each end that detection leaves out; True if drawn."""
    count = as_float(end_nodes)
    if not math.isfinite(count) or count < 1 or n_nodes < 1:
        return False
    count = min(int(count), n_nodes)
    for x0, x1 in ((-0.5, count - 0.5), (n_nodes - count - 0.5, n_nodes - 0.5)):
        ax.axvspan(x0, x1, facecolor="#9a9a9a", alpha=0.35, edgecolor="#666666", hatch="..",
                   lw=0.0, zorder=0.5,
                   label=f"not used by detection ({count} end nodes)" if x0 < 0 else None)
    return True


def plot_asymmetry_profile(ai, *, threshold=None, se=None, segments=(), levels=None,
                           peak_node=None, end_nodes=None, title=None) -> Figure:
    """FA asymmetry index AI = (L − R)/(L + R) along the nodes.

    Parameters
    ----------
    ai : sequence of float
        AI per node (None or 'n/a' where unknown).
    threshold : float, optional
        |AI| detection threshold of the fixed-AI rule, drawn at ± its value.
    se : sequence of float, optional
        Bootstrap standard error of AI per node (``asymmetry.fa_ai_profile_se`` of
        the metrics), drawn as a band of ± 2 SE around the profile.
    segments : sequence of dict
        Detected segments (``start_node``, ``end_node``), hatched.
    levels : list of str or None, optional
        Level name per node, for the background bands.
    peak_node : int, optional
        Node of the finding's peak, a dotted line.
    end_nodes : int, optional
        Nodes at each end that detection ignores (``localization.thresholds.end_nodes``
        under the fixed-AI rule), greyed.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ai = np.array([as_float(v) for v in ai], dtype=float)
    nodes = np.arange(len(ai))
    fig = new_figure(8.6, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    if levels:
        _shade_levels(ax, levels, nodes)
    _shade_ignored_ends(ax, len(ai), end_nodes)
    _shade_segments(ax, segments)
    ax.axhline(0, color="#555", lw=0.8)
    finite = np.isfinite(ai)
    limit = np.nanmax(np.abs(ai)) if finite.any() else 0.1
    if se is not None:
        band = 2 * np.array([as_float(v) for v in se], dtype=float)[:len(ai)]
        band = np.concatenate([band, np.full(len(ai) - len(band), np.nan)])
        shown = finite & np.isfinite(band)
        if shown.any():
            ax.fill_between(nodes, ai - band, ai + band, where=shown, facecolor="#8c8c8c",
                            alpha=0.2, edgecolor="#6e6e6e", lw=0.6, zorder=1.5,
                            label="± 2 SE (bootstrap)")
            limit = max(limit, float(np.max(np.abs(ai[shown]) + band[shown])))
    ax.plot(nodes, ai, color="#333", lw=2.0, label="FA AI")
    ax.fill_between(nodes, 0, ai, where=finite & (ai > 0), color=COLORS["left"], alpha=0.25,
                    lw=0, label="left FA higher")
    ax.fill_between(nodes, 0, ai, where=finite & (ai < 0), color=COLORS["right"], alpha=0.25,
                    lw=0, label="right FA higher")
    thr = as_float(threshold)
    if math.isfinite(thr):
        ax.axhline(thr, color=PEAK_COLOR, lw=1.0, ls="--", label=f"± threshold ({thr:g})")
        ax.axhline(-thr, color=PEAK_COLOR, lw=1.0, ls="--")
        limit = max(limit, thr)
    if peak_node is not None and math.isfinite(as_float(peak_node)):
        ax.axvline(as_float(peak_node), color=PEAK_COLOR, lw=1.2, ls=":", label="peak node")
    limit = max(limit * 1.35, 0.05)
    ax.set_ylim(-limit, limit)
    ax.set_xlim(-0.5, max(len(ai), 1) - 0.5)
    ax.set_ylabel("AI = (L − R) / (L + R)")
    ax.text(1.005, 0.97, "left FA\nhigher", transform=ax.transAxes, fontsize=7, va="top",
            color="#555")
    ax.text(1.005, 0.03, "right FA\nhigher", transform=ax.transAxes, fontsize=7,
            va="bottom", color="#555")
    _node_axis(ax)
    # Below the axes: inside, the legend hid the profile where a finding dips.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7.5, ncol=4,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


_DIFF_LABELS = {"md": "MD", "rd": "RD", "ad": "AD", "fa": "FA"}


def plot_diffusivity_profiles(profiles, *, metrics=("md", "rd", "ad"), segments=(),
                              title=None) -> Figure:
    """Small multiples of left vs right diffusivity profiles (MD, RD, AD)."""
    fig = new_figure(3.0 * len(metrics) + 0.6, 3.0)
    levels = band_levels(profiles)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        values = {s: np.asarray(profiles[s][metric], float) for s in SIDES
                  if s in profiles and metric in profiles[s]}
        finite = [v[np.isfinite(v)] for v in values.values()]
        finite = np.concatenate(finite) if finite else np.array([])
        scale, unit = 1.0, ""
        if finite.size and 0 < np.nanmax(np.abs(finite)) < 0.05:
            scale, unit = 1e3, " (×10⁻³ mm²/s)"
        n_nodes = 100
        for side, v in values.items():
            n_nodes = max(n_nodes, len(v))
            ax.plot(profiles[side]["node"], v * scale, color=COLORS[side], lw=1.6,
                    label=TRACT_NAMES[side])
        if levels:
            _shade_levels(ax, levels, np.arange(len(levels)), annotate=False)
        _shade_segments(ax, segments, label=False)
        ax.set_xlim(-0.5, n_nodes - 0.5)
        ax.set_title(_DIFF_LABELS.get(metric, metric.upper()) + unit, fontsize=9)
        ax.set_xlabel("Node (inferior → superior)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="y", color="#e5e5e5", lw=0.6)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
