"""Normative CST profiles from control participants, and each other run against them.

A fixed asymmetry threshold has to sit above the healthy left-right difference
everywhere along the tract, including where the CST crosses other bundles and
healthy |AI| is largest; norms from controls scanned with the same protocol
replace it by a per-node reference: a node is unusual when it departs from the
controls' mean by much more than the controls vary there.

Controls are the participants whose ``group`` column in ``participants.tsv``
reads ``control`` (or ``hc``, ``healthy``, ``healthy_control``; any case).

The per-node statistic is Crawford & Howell's (1998) single-case t,
``t = (x - mean) / (sd * sqrt((n + 1) / n))``, which allows for the uncertainty
of a mean and SD estimated from a small control sample (Crawford JR, Howell DC.
Comparing an individual's test score against norms derived from small samples.
Clin Neuropsychol 1998;12:482-486. doi:10.1076/clin.12.4.482.7241).
"""

import numpy as np

from ..clinical.participants import participant_rows
from ..cst import TRACT_NAMES
from ..io.profiles_table import read_profiles_tsv
from .localization import DEFAULT_THRESHOLDS, deviation_segments, primary_finding
from .profiles import PROFILE_METRICS, asymmetry_index

CONTROL_GROUPS = {"control", "controls", "hc", "healthy", "healthy_control"}
#: Fewest controls for norms: an SD from fewer is meaningless.
MIN_CONTROLS = 3
#: Finding rules on the t profile of the FA asymmetry: |t| >= node_t at ``min_nodes``
#: consecutive nodes of one sign, with a mean |t| of at least ``segment_mean_t``
#: (|t| = 3: beyond what 1 control in ~100 shows at a node with 10+ controls).
DEFAULT_NORMATIVE_THRESHOLDS = {"node_t": 3.0, "min_nodes": DEFAULT_THRESHOLDS["min_nodes"],
                                "segment_mean_t": 3.0,
                                "end_nodes": DEFAULT_THRESHOLDS["end_nodes"]}
REFERENCE = ("Crawford JR, Howell DC. Comparing an individual's test score against norms "
             "derived from small samples. Clin Neuropsychol 1998;12:482-486. "
             "doi:10.1076/clin.12.4.482.7241")


def control_labels(bids_dir):
    """Labels (without ``sub-``) of the control participants in ``participants.tsv``."""
    return {participant[4:] for participant, row in participant_rows(bids_dir).items()
            if participant.startswith("sub-")
            and (row.get("group") or "").strip().lower() in CONTROL_GROUPS}


def read_profiles(tsv_path):
    """A run's profiles TSV as per-side arrays, with the FA asymmetry index per node.

    Returns
    -------
    dict
        side -> :func:`pipeline.io.profiles_table.read_profiles_tsv`'s arrays plus ``xyz``
        ((n_nodes, 3) RAS mm); ``fa_ai``: (n_nodes,) (FA_L - FA_R) / (FA_L + FA_R).
    """
    profiles = read_profiles_tsv(tsv_path)
    for side in TRACT_NAMES:
        profiles[side]["xyz"] = np.column_stack([profiles[side][a] for a in "xyz"])
    profiles["fa_ai"] = asymmetry_index(profiles["left"]["fa"], profiles["right"]["fa"])
    return profiles


def _profile_values(profiles):
    """(tract, metric) -> (n_nodes,) values of one run, the asymmetry as ("asymmetry", "fa_ai")."""
    values = {(TRACT_NAMES[side], metric): profiles[side][metric]
              for side in TRACT_NAMES for metric in PROFILE_METRICS}
    values[("asymmetry", "fa_ai")] = profiles["fa_ai"]
    return values


def normative_profiles(control_profiles):
    """Per-node mean, SD (ddof 1) and n of every metric over the controls' runs.

    Parameters
    ----------
    control_profiles : list of dict from :func:`read_profiles`

    Returns
    -------
    dict
        (tract, metric) -> {"mean", "sd": (n_nodes,) float, "n": (n_nodes,) int}; a node
        with fewer than :data:`MIN_CONTROLS` finite values gets NaN.
    """
    stacked = {}
    for profiles in control_profiles:
        for key, values in _profile_values(profiles).items():
            stacked.setdefault(key, []).append(values)
    norms = {}
    for key, runs in stacked.items():
        values = np.vstack(runs)
        finite = np.isfinite(values)
        n = finite.sum(axis=0)
        enough = n >= MIN_CONTROLS
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(finite, values, 0.0).sum(axis=0) / n
            squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
            sd = np.sqrt(squares / (n - 1))
        norms[key] = {"mean": np.where(enough, mean, np.nan), "sd": np.where(enough, sd, np.nan),
                      "n": n}
    return norms


def single_case_t(values, norm):
    """Crawford-Howell t of one run's per-node values against the controls' norm."""
    n = norm["n"].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.asarray(values, float) - norm["mean"]) / (norm["sd"] * np.sqrt((n + 1) / n))


def compare_with_norms(profiles, norms, thresholds=None):
    """Per-node t of a run against the norms, and the finding from the FA asymmetry's t.

    Returns
    -------
    dict
        ``t``: (tract, metric) -> (n_nodes,) t; ``localization``: ``umn_damage``,
        ``affected_side`` ("none" without a finding), ``level``, ``peak_ras_mm``,
        ``peak_node``, ``confidence``, ``segments`` (with ``peak_t``, ``mean_t`` and
        the affected side's FA t at the peak), ``thresholds``, ``reference``.
    """
    thresholds = {**DEFAULT_NORMATIVE_THRESHOLDS, **(thresholds or {})}
    values = _profile_values(profiles)
    t = {key: single_case_t(values[key], norm) for key, norm in norms.items()}
    ai_t = t[("asymmetry", "fa_ai")]
    segments = deviation_segments(
        ai_t, {side: profiles[side]["level"] for side in TRACT_NAMES},
        {side: profiles[side]["xyz"] for side in TRACT_NAMES},
        node_threshold=thresholds["node_t"],
        min_nodes=thresholds["min_nodes"], segment_mean=thresholds["segment_mean_t"],
        end_nodes=thresholds["end_nodes"], statistic="t")
    for segment in segments:
        fa_t = t[(TRACT_NAMES[segment["side"]], "fa")][segment["peak_node"]]
        segment["fa_t_affected_side_at_peak"] = round(float(fa_t), 3)
    localization = {"umn_damage": False, "affected_side": "none", "level": None,
                    "peak_ras_mm": None, "peak_node": None, "confidence": None,
                    **(primary_finding(segments, statistic="t") or {}),
                    "segments": segments, "thresholds": thresholds, "reference": REFERENCE}
    return {"t": t, "localization": localization}
