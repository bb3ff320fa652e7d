"""Normative profiles from controls and single-case t against them, on a synthetic group.

Eight controls and two other participants, whose profiles are made here: one healthy, one
with the left CST's FA lowered by 15 % over nodes 38-48 (internal capsule). That lesion's
asymmetry (AI about -0.08) stays below the fixed rule's 0.10 per node; against the
controls, whose AI varies by ~0.01 per node, it is a finding.
"""

import csv
import json

import numpy as np
import pytest

from pipeline.tractometry import normative
from pipeline.tractometry.group import run_group_level
from pipeline.tractometry.localization import localize_damage

N_NODES = 100
LEVELS = (["pons"] * 20 + ["cerebral_peduncle"] * 15 + ["internal_capsule"] * 21
          + ["corona_radiata"] * 30 + ["cortex"] * 14)
CONTROLS = [f"ctl{i:02d}" for i in range(1, 9)]
LESION_NODES = slice(38, 49)


def _profiles(rng, lesion=False):
    """Per-side FA/MD/RD/AD profiles: a shared healthy shape plus 0.01 FA noise per node."""
    nodes = np.arange(N_NODES)
    shape = 0.55 + 0.1 * np.sin(nodes / 15.0)
    sides = {}
    for side, sign in (("left", -1), ("right", 1)):
        fa = shape + rng.normal(0, 0.01, N_NODES)
        if lesion and side == "left":
            fa[LESION_NODES] *= 0.85
        sides[side] = {"fa": fa, "md": 7.5e-4 + rng.normal(0, 1e-5, N_NODES),
                       "x": sign * (20 - nodes / 10), "y": -20 + nodes / 5, "z": -40 + nodes}
    return sides


def _write_run(out, label, sides, *, assessable=True, fa_ai_plic=0.0):
    dwi = out / f"sub-{label}" / "dwi"
    dwi.mkdir(parents=True)
    with open(dwi / f"sub-{label}_desc-profiles_tractometry.tsv", "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["tract", "node", "fa", "md", "rd", "ad", "x", "y", "z", "level"])
        for side, tract in (("left", "CST_L"), ("right", "CST_R")):
            p = sides[side]
            for n in range(N_NODES):
                writer.writerow([tract, n, p["fa"][n], p["md"][n], 5e-4, 1.3e-3, p["x"][n],
                                 p["y"][n], p["z"][n], LEVELS[n]])
    summary = {side: {"n_streamlines": 500, "fa_mean": float(np.mean(sides[side]["fa"])),
                      "md_mean": 7.5e-4} for side in sides}
    metrics = {"subject": label, "cst": summary,
               "localization": {"umn_damage": False if assessable else None,
                                "affected_side": "none" if assessable else None, "level": None,
                                "peak_ras_mm": None},
               "asymmetry": {"fa_ai_tract": 0.0, "fa_ai_plic": fa_ai_plic},
               "prognosis": {"category": "no_imaging_evidence_of_umn_damage" if assessable
                             else "not_assessable"},
               "qc": {"assessable": assessable}}
    (dwi / f"sub-{label}_desc-cst_metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def group(tmp_path):
    rng = np.random.default_rng(7)
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    rows = [f"sub-{c}\tcontrol" for c in CONTROLS] + ["sub-pat01\tpatient", "sub-vol01\tn/a",
                                                     "sub-ctlbad\tControl"]
    (bids / "participants.tsv").write_text("participant_id\tgroup\n" + "\n".join(rows) + "\n")
    for label in CONTROLS:
        _write_run(out, label, _profiles(rng))
    # a control QC rejected, its PLIC ROI not covered: a PLIC asymmetry of no meaning
    _write_run(out, "ctlbad", _profiles(rng), assessable=False, fa_ai_plic=0.31)
    _write_run(out, "pat01", _profiles(rng, lesion=True))
    _write_run(out, "vol01", _profiles(rng))
    return bids, out


def test_norms_are_the_controls_mean_sd_and_n(group):
    bids, out = group
    assert normative.control_labels(bids) == {*CONTROLS, "ctlbad"}
    runs = [normative.read_profiles(out / f"sub-{c}" / "dwi" /
                                    f"sub-{c}_desc-profiles_tractometry.tsv") for c in CONTROLS]
    norms = normative.normative_profiles(runs)
    fa = np.vstack([r["left"]["fa"] for r in runs])
    assert np.allclose(norms[("CST_L", "fa")]["mean"], fa.mean(axis=0))
    assert np.allclose(norms[("CST_L", "fa")]["sd"], fa.std(axis=0, ddof=1))
    assert set(norms[("CST_L", "fa")]["n"]) == {8}
    ai = np.vstack([r["fa_ai"] for r in runs])
    assert np.allclose(norms[("asymmetry", "fa_ai")]["mean"], ai.mean(axis=0))
    # Crawford-Howell: the SD is widened by sqrt((n + 1) / n)
    norm = {"mean": np.array([0.5]), "sd": np.array([0.1]), "n": np.array([8])}
    assert normative.single_case_t([0.8], norm)[0] == pytest.approx(3 / np.sqrt(9 / 8))
    # too few controls at a node: no norm there
    short = normative.normative_profiles(runs[:2])
    assert np.isnan(short[("CST_L", "fa")]["mean"]).all()


def test_patient_is_found_against_the_norms_but_not_by_the_fixed_rule(group):
    bids, out = group
    written = run_group_level(out, bids)
    assert written["n_controls"] == 8   # the QC-rejected control is left out
    assert len(written["compared"]) == 2

    patient = json.loads((out / "sub-pat01" / "dwi" /
                          "sub-pat01_desc-normative_localization.json").read_text())
    loc = patient["localization"]
    assert loc["umn_damage"] is True and loc["affected_side"] == "left"
    assert loc["level"] == "internal_capsule"
    assert 38 <= loc["peak_node"] <= 48
    (segment,) = loc["segments"]
    assert segment["peak_t"] < -3 and segment["fa_t_affected_side_at_peak"] < -3
    assert "Crawford" in loc["reference"] and patient["provenance"]["inputs"]

    # The same patient under the fixed asymmetry rule: below its thresholds.
    profiles = normative.read_profiles(out / "sub-pat01" / "dwi" /
                                       "sub-pat01_desc-profiles_tractometry.tsv")
    fixed = localize_damage(profiles["fa_ai"], {s: profiles[s]["level"] for s in ("left", "right")},
                            {s: profiles[s]["xyz"] for s in ("left", "right")},
                            thresholds={"method": "fixed-ai"})
    assert fixed["umn_damage"] is False

    volunteer = json.loads((out / "sub-vol01" / "dwi" /
                            "sub-vol01_desc-normative_localization.json").read_text())
    assert volunteer["localization"]["umn_damage"] is False


def test_group_outputs_tables_and_page(group, capsys):
    """Through the BIDS-App entry, as a user runs it."""
    import pandas as pd

    from workflows.cli import bids_app_parser, run_bids_app

    bids, out = group
    assert run_bids_app(bids_app_parser(), [str(bids), str(out), "group"]) == 0
    printed = capsys.readouterr().out
    assert "8 control runs; 2 other run(s) compared" in printed
    norms = pd.read_csv(out / "group_desc-norms_tractometry.tsv", sep="\t")
    assert len(norms) == N_NODES * 9  # 4 metrics x 2 tracts + the asymmetry
    assert set(norms["n"]) == {8}
    sidecar = json.loads((out / "group_desc-norms_tractometry.json").read_text())
    assert len(sidecar["Controls"]) == 8 and len(sidecar["SourceChecksums"]) == 8
    table = pd.read_csv(out / "group_desc-cst_metrics.tsv", sep="\t").set_index("participant_id")
    assert table.loc["sub-pat01", "normative_affected_side"] == "left"
    assert table.loc["sub-pat01", "normative_level"] == "internal_capsule"
    assert not table.loc["sub-vol01", "normative_umn_damage"]
    assert table.loc["sub-ctl01", "control"] and pd.isna(table.loc["sub-ctl01",
                                                                   "normative_umn_damage"])
    t = pd.read_csv(out / "sub-pat01" / "dwi" / "sub-pat01_desc-normative_tractometry.tsv",
                    sep="\t")
    assert list(t.columns) == ["node", "level", "fa_left", "fa_right", "fa_ai", "t_fa_left",
                               "t_fa_right", "t_fa_ai"]
    assert t.loc[38:48, "t_fa_left"].mean() < -5
    page = (out / "group.html").read_text()
    assert page.count("<img") == 2 and "data:image/png;base64," in page
    assert "finding on the left CST at the internal_capsule" in page


def test_not_assessable_run_has_empty_cells_in_the_group_table(group):
    """No finding, no asymmetry and no tract mean of a failed CST reads as a result."""
    from pipeline.tractometry.group import NOT_ASSESSABLE_EMPTY

    bids, out = group
    run_group_level(out, bids)
    with open(out / "group_desc-cst_metrics.tsv", newline="") as handle:
        rows = {r["participant_id"]: r for r in csv.DictReader(handle, delimiter="\t")}
    failed, passed = rows["sub-ctlbad"], rows["sub-vol01"]
    assert failed["assessable"] == "False"
    assert {"umn_damage", "affected_side", "fa_ai_plic", "fa_ai_tract"} <= set(NOT_ASSESSABLE_EMPTY)
    assert {c: failed[c] for c in NOT_ASSESSABLE_EMPTY} == dict.fromkeys(NOT_ASSESSABLE_EMPTY,
                                                                          "n/a")
    # kept: why it failed, and that it was not assessed
    assert failed["n_streamlines_left"] == "500"
    assert failed["prognosis_category"] == "not_assessable"
    assert failed["control"] == "True" and failed["normative_umn_damage"] == "n/a"
    # an assessable run keeps its values, a "no" included
    assert passed["umn_damage"] == "False" and passed["affected_side"] == "none"
    assert float(passed["fa_ai_plic"]) == 0.0 and passed["fa_mean_left"] != "n/a"
    page = (out / "group.html").read_text()
    assert "0.31" not in page


def test_without_enough_controls_no_norms(tmp_path):
    rng = np.random.default_rng(1)
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tgroup\nsub-a\tcontrol\n"
                                           "sub-b\tcontrol\nsub-c\tpatient\n")
    for label in "abc":
        _write_run(out, label, _profiles(rng))
    written = run_group_level(out, bids)
    assert written["norms"] is None and written["compared"] == []
    assert not (out / "group_desc-norms_tractometry.tsv").exists()
    assert "at least 3" in (out / "group.html").read_text()
