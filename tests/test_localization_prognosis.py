"""Tests of damage localisation (pipeline/tractometry/localization.py) and the rule-based
prognosis summary (pipeline/clinical/prognosis.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.clinical.prognosis import DISCLAIMER, prognosis_summary
from pipeline.tractometry.localization import (
    DEFAULT_THRESHOLDS,
    asymmetric_segments,
    localize_damage,
)

N = 100
DEFAULTS = dict(node_ai=DEFAULT_THRESHOLDS["node_ai"], min_nodes=DEFAULT_THRESHOLDS["min_nodes"],
                end_nodes=DEFAULT_THRESHOLDS["end_nodes"])
#: These tests cover the fixed-|AI| rule (the calibrated one: test_calibrated_detection.py).
FIXED = {"method": "fixed-ai"}


def _noise(seed=0, scale=0.02):
    return np.random.default_rng(seed).uniform(-scale, scale, N)


def _node_geometry():
    """Different level labels and positions per side, so the side used is observable."""
    bounds_left = [(0, 15, "medulla"), (15, 30, "pons"), (30, 45, "cerebral_peduncle"),
                   (45, 65, "internal_capsule"), (65, 90, "corona_radiata"), (90, 100, "cortex")]
    bounds_right = [(0, 20, "medulla"), (20, 35, "pons"), (35, 50, "cerebral_peduncle"),
                    (50, 70, "internal_capsule"), (70, 95, "corona_radiata"), (95, 100, "cortex")]
    levels = {}
    for side, bounds in (("left", bounds_left), ("right", bounds_right)):
        lv = [None] * N
        for a, b, name in bounds:
            lv[a:b] = [name] * (b - a)
        levels[side] = lv
    z = np.linspace(-40.0, 60.0, N)
    xyz = {"left": np.stack([-20.0 - 0.1 * np.arange(N), np.full(N, 3.33), z], axis=1),
           "right": np.stack([20.0 + 0.1 * np.arange(N), np.full(N, -4.44), z + 0.5], axis=1)}
    return levels, xyz


# --------------------------------------------------------------------------- asymmetric_segments

def test_segment_found_in_noisy_profile():
    ai = _noise()
    ai[40:52] = -0.2 + _noise(1, 0.01)[40:52]
    assert asymmetric_segments(ai, **DEFAULTS) == [(40, 51, -1)]


def test_positive_segment_and_sign():
    ai = _noise()
    ai[60:70] = 0.15
    assert asymmetric_segments(ai, **DEFAULTS) == [(60, 69, 1)]


def test_short_dip_is_not_a_segment():
    ai = _noise()
    ai[40:44] = -0.2
    assert asymmetric_segments(ai, **DEFAULTS) == []
    # exactly min_nodes long is enough
    ai[40:46] = -0.2
    assert asymmetric_segments(ai, **DEFAULTS) == [(40, 45, -1)]


@pytest.mark.parametrize("lo, hi", [(1, 9), (91, 99)])
def test_dip_inside_end_nodes_is_ignored(lo, hi):
    ai = _noise()
    ai[lo:hi + 1] = -0.3
    assert asymmetric_segments(ai, **DEFAULTS) == []
    # without the end exclusion the same dip is a segment
    assert asymmetric_segments(ai, node_ai=0.1, min_nodes=6, end_nodes=0) == [(lo, hi, -1)]


def test_sign_change_splits_segments_and_nan_is_ignored():
    ai = np.zeros(N)
    ai[20:28] = 0.2
    ai[28:36] = -0.2
    ai[50:60] = -0.2
    ai[55] = np.nan  # breaks the run into 5 + 4 nodes
    assert asymmetric_segments(ai, **DEFAULTS) == [(20, 27, 1), (28, 35, -1)]


def test_threshold_is_inclusive():
    ai = np.zeros(N)
    ai[30:40] = -0.10
    assert asymmetric_segments(ai, **DEFAULTS) == [(30, 39, -1)]
    ai[30:40] = -0.0999
    assert asymmetric_segments(ai, **DEFAULTS) == []


# --------------------------------------------------------------------------- localize_damage

def test_negative_ai_means_left_affected():
    levels, xyz = _node_geometry()
    ai = _noise()
    ai[40:52] = -0.2
    ai[47] = -0.35  # peak
    result = localize_damage(ai, levels, xyz, thresholds=FIXED)
    assert result["assessable"] is True
    assert result["umn_damage"] is True
    assert result["affected_side"] == "left"
    assert result["peak_node"] == 47
    assert result["level"] == levels["left"][47] == "internal_capsule"
    assert levels["right"][47] == "cerebral_peduncle"  # the other side would say otherwise
    assert result["peak_ras_mm"] == [round(v, 1) for v in xyz["left"][47].tolist()]
    assert result["peak_ras_mm"] == [-24.7, 3.3, pytest.approx(round(-40 + 47 * 100 / 99, 1))]
    (seg,) = result["segments"]
    assert (seg["start_node"], seg["end_node"], seg["side"]) == (40, 51, "left")
    assert seg["start_level"] == "cerebral_peduncle" and seg["end_level"] == "internal_capsule"
    assert seg["peak_ai"] == pytest.approx(-0.35)
    assert seg["summed_abs_ai"] == pytest.approx(11 * 0.2 + 0.35)
    assert seg["mean_ai"] == pytest.approx(-(11 * 0.2 + 0.35) / 12, abs=1e-4)
    # long (12 ≥ 2 × min_nodes) and strong (mean |AI| 0.21 ≥ 1.5 × segment_mean_ai)
    assert result["confidence"] == "high"


def test_positive_ai_means_right_affected():
    levels, xyz = _node_geometry()
    ai = _noise()
    ai[62:70] = 0.22
    ai[67] = 0.28
    result = localize_damage(ai, levels, xyz, thresholds=FIXED)
    assert result["umn_damage"] is True
    assert result["affected_side"] == "right"
    assert result["peak_node"] == 67
    assert result["level"] == levels["right"][67] == "internal_capsule"
    assert levels["left"][67] == "corona_radiata"  # the other side would say otherwise
    assert result["peak_ras_mm"] == [round(v, 1) for v in xyz["right"][67].tolist()]
    assert result["peak_ras_mm"][0] == pytest.approx(26.7)
    assert result["peak_ras_mm"][1] == pytest.approx(-4.4)
    # strong (mean 0.23 ≥ 0.18) but not long (8 < 12)
    assert result["confidence"] == "moderate"


@pytest.mark.parametrize("larger", ["first", "second"])
def test_primary_is_segment_with_largest_summed_ai(larger):
    levels, xyz = _node_geometry()
    ai = np.zeros(N)
    # first segment: left affected, 8 nodes; second: right affected, 8 nodes
    a, b = (0.3, 0.22) if larger == "first" else (0.22, 0.3)
    ai[20:28] = -a
    ai[70:78] = b
    result = localize_damage(ai, levels, xyz, thresholds=FIXED)
    assert [s["side"] for s in result["segments"]] == ["left", "right"]
    if larger == "first":
        assert result["affected_side"] == "left"
        assert result["peak_node"] == 20  # ties: first node of the run
        assert result["level"] == levels["left"][20] == "pons"
    else:
        assert result["affected_side"] == "right"
        assert result["peak_node"] == 70
        assert result["level"] == levels["right"][70] == "corona_radiata"


def test_longer_weaker_segment_can_be_primary():
    levels, xyz = _node_geometry()
    ai = np.zeros(N)
    ai[20:26] = -0.35   # summed 2.1, stronger peak
    ai[60:80] = 0.22    # summed 4.4
    result = localize_damage(ai, levels, xyz, thresholds=FIXED)
    assert result["affected_side"] == "right"
    assert 60 <= result["peak_node"] <= 79


def test_persistent_but_weak_asymmetry_is_not_a_finding():
    """8 nodes just above the node threshold: a run, but its mean |AI| (0.11) is too small."""
    levels, xyz = _node_geometry()
    ai = _noise()
    ai[63:71] = 0.105
    ai[66] = 0.14
    assert asymmetric_segments(ai, node_ai=0.1, min_nodes=6, end_nodes=10) == [(63, 70, 1)]
    result = localize_damage(ai, levels, xyz, thresholds=FIXED)
    assert result["umn_damage"] is False and result["segments"] == []
    lowered = localize_damage(ai, levels, xyz, thresholds={**FIXED, "segment_mean_ai": 0.10})
    assert lowered["umn_damage"] is True and lowered["affected_side"] == "right"


def test_not_assessable_makes_no_claim():
    levels, xyz = _node_geometry()
    ai = np.zeros(N)
    ai[40:60] = -0.4
    result = localize_damage(ai, levels, xyz, thresholds=FIXED, assessable=False)
    assert result["assessable"] is False
    # unknown, not "no damage": null in the metrics JSON, never false / "none"
    assert result["umn_damage"] is None
    assert result["affected_side"] is None
    assert result["level"] is None and result["peak_ras_mm"] is None
    assert result["peak_node"] is None and result["confidence"] is None
    assert result["segments"] == []
    # the public contract keeps every key, whatever the QC outcome
    assert {"assessable", "umn_damage", "affected_side", "level", "peak_ras_mm", "peak_node",
            "confidence", "segments", "thresholds"} <= set(result)
    assert json.loads(json.dumps(result, default=float))["umn_damage"] is None


def test_flat_profile_has_no_damage():
    levels, xyz = _node_geometry()
    result = localize_damage(_noise(3, 0.05), levels, xyz, thresholds=FIXED)
    assert result["assessable"] is True
    assert result["umn_damage"] is False
    assert result["affected_side"] == "none"
    assert result["level"] is None and result["peak_node"] is None
    assert result["segments"] == []


def test_thresholds_override():
    levels, xyz = _node_geometry()
    ai = np.zeros(N)
    ai[40:44] = -0.08
    assert localize_damage(ai, levels, xyz, thresholds=FIXED)["umn_damage"] is False
    result = localize_damage(ai, levels, xyz, thresholds={
        **FIXED, "node_ai": 0.05, "min_nodes": 4, "segment_mean_ai": 0.05})
    assert result["umn_damage"] is True and result["affected_side"] == "left"
    assert result["thresholds"]["node_ai"] == 0.05
    assert result["thresholds"]["end_nodes"] == DEFAULT_THRESHOLDS["end_nodes"]


# --------------------------------------------------------------------------- prognosis_summary

def _damage(side="left", level="internal_capsule"):
    return {"assessable": True, "umn_damage": True, "affected_side": side, "level": level}


NO_DAMAGE = {"assessable": True, "umn_damage": False, "affected_side": "none", "level": None}
NOT_ASSESSABLE = {"assessable": False, "umn_damage": None, "affected_side": None}


def _check_common(out):
    assert out["disclaimer"] == DISCLAIMER
    assert "not a medical device" in out["disclaimer"]
    assert isinstance(out["rationale"], list) and out["rationale"]


def test_prognosis_not_assessable():
    out = prognosis_summary(NOT_ASSESSABLE, 0.4, qc_reasons=["too few streamlines (left)"])
    _check_common(out)
    assert out["category"] == "not_assessable"
    assert out["rationale"] == ["too few streamlines (left)"]
    assert out["references"] == []
    assert "recovery" in out["summary"] and "PREP" not in out["summary"]
    assert prognosis_summary(NOT_ASSESSABLE, 0.0)["rationale"] == ["Quality control failed."]


def test_prognosis_no_damage_mentions_lmn():
    out = prognosis_summary(NO_DAMAGE, 0.02)
    _check_common(out)
    assert out["category"] == "no_imaging_evidence_of_umn_damage"
    assert "lower-motor-neuron" in out["summary"].lower()
    assert "not assessable" in out["summary"]
    assert "PLIC FA asymmetry |AI| = 0.020 (PREP cut-off 0.25)." in out["rationale"]
    assert any("Werring" in r for r in out["references"])


def test_prognosis_damage_at_or_above_cutoff():
    out = prognosis_summary(_damage("left"), -0.30)  # left FA lower ⇒ AI negative
    _check_common(out)
    assert out["category"] == "umn_damage_plic_asymmetry_at_or_above_prep_cutoff"
    assert "left CST" in out["summary"] and "right body side" in out["summary"]
    assert "'None'" in out["summary"]
    assert out["rationale"][0] == "Reduced FA along the left CST, peak at the internal capsule."
    assert "PLIC FA asymmetry |AI| = 0.300 (PREP cut-off 0.25)." in out["rationale"]
    assert any("Lower-motor-neuron" in r for r in out["rationale"])
    assert len(out["references"]) == 2
    # exactly at the cut-off counts as "at or above"
    exact = prognosis_summary(_damage("right"), 0.25)
    assert exact["category"] == "umn_damage_plic_asymmetry_at_or_above_prep_cutoff"
    assert "left body side" in exact["summary"]


def test_prognosis_damage_below_cutoff():
    out = prognosis_summary(_damage("right", "corona_radiata"), 0.12)
    _check_common(out)
    assert out["category"] == "umn_damage_plic_asymmetry_below_prep_cutoff"
    assert "'Limited'" in out["summary"]
    assert "right CST" in out["summary"] and "left body side" in out["summary"]
    assert out["rationale"][0] == "Reduced FA along the right CST, peak at the corona radiata."


def test_prognosis_threshold_is_configurable():
    assert prognosis_summary(_damage(), 0.15)["category"] == \
        "umn_damage_plic_asymmetry_below_prep_cutoff"
    out = prognosis_summary(_damage(), 0.15, prep_plic_ai=0.1)
    assert out["category"] == "umn_damage_plic_asymmetry_at_or_above_prep_cutoff"
    assert out["thresholds"] == {"prep_plic_ai": 0.1}
    assert "PLIC FA asymmetry |AI| = 0.150 (PREP cut-off 0.1)." in out["rationale"]


def test_prognosis_nan_plic_is_reported_as_unmeasured():
    out = prognosis_summary(_damage("left"), float("nan"))
    _check_common(out)
    assert out["category"].startswith("umn_damage")
    assert "PLIC FA asymmetry could not be measured." in out["rationale"]
    assert not any("nan" in r.lower().split() for r in out["rationale"])
    no_dmg = prognosis_summary(NO_DAMAGE, math.nan)
    assert no_dmg["category"] == "no_imaging_evidence_of_umn_damage"
    assert "PLIC FA asymmetry could not be measured." in no_dmg["rationale"]


def test_prognosis_nan_plic_does_not_claim_below_cutoff():
    out = prognosis_summary(_damage("left"), float("nan"))
    assert out["category"] == "umn_damage_plic_asymmetry_not_measurable"
    assert "below the PREP cut-off" not in out["summary"]


@pytest.mark.parametrize("loc, ai", [(NOT_ASSESSABLE, 0.3), (NO_DAMAGE, 0.0),
                                     (_damage(), 0.5), (_damage(), 0.01),
                                     (_damage(), float("nan"))])
def test_disclaimer_always_present(loc, ai):
    out = prognosis_summary(loc, ai)
    assert out["disclaimer"] == DISCLAIMER
    assert set(out) >= {"category", "summary", "rationale", "references", "thresholds",
                        "disclaimer"}
