"""The whole command line on the demo phantom, whose CSTs and lesion are known."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from .conftest import PHANTOM_CLINICAL, assert_same_tractograms, load_metrics
from .conftest import PHANTOM_STEM as STEM

pytestmark = pytest.mark.slow


def test_lesion_side_level_and_peak(lesion_run):
    out, truth, result = lesion_run
    metrics = load_metrics(out, STEM)
    loc = metrics["localization"]
    assert metrics["cst"]["left"]["n_streamlines"] >= 100
    assert metrics["cst"]["right"]["n_streamlines"] >= 100
    assert loc["umn_damage"] is True
    assert loc["affected_side"] == truth["lesion"]["side"]
    assert loc["level"] == truth["lesion"]["level"]
    error = np.linalg.norm(np.subtract(loc["peak_ras_mm"], truth["lesion"]["centre_ras_mm"]))
    assert error <= 12.0, f"peak {loc['peak_ras_mm']} is {error:.1f} mm from the lesion"
    # The lesioned (left) side has the lower FA, so the asymmetry is negative.
    assert metrics["asymmetry"]["fa_ai_tract"] < 0
    by_level = {side: metrics["cst"][side]["fa_by_level"] for side in ("left", "right")}
    assert by_level["left"]["internal_capsule"] < by_level["right"]["internal_capsule"] - 0.1
    assert abs(by_level["left"]["pons"] - by_level["right"]["pons"]) < 0.05
    assert "UMN damage shows along the left CST" in result.stdout


def test_prep2_from_participants_tsv_in_metrics_and_report(lesion_run):
    """SAFE 3, MEP-, NIHSS 9 in participants.tsv: PREP2 'Poor', beside the imaging tier."""
    out, _, _ = lesion_run
    metrics = load_metrics(out, STEM)
    assert metrics["clinical"] == {**PHANTOM_CLINICAL, "diagnosis": None}
    prep2 = metrics["prognosis"]["prep2"]
    assert prep2["prediction"] == "Poor" and prep2["missing"] == []
    assert metrics["prognosis"]["category"].startswith("umn_damage_")
    html = (out / f"{STEM}.html").read_text()
    assert "PREP2 prediction:" in html and "Step 3: NIHSS 9 ≥ 7: Poor." in html


def test_tracts_are_on_their_own_side_in_world_coordinates(lesion_run):
    out, _, _ = lesion_run
    for hemi, sign in (("L", -1), ("R", 1)):
        trk = out / "sub-subject01" / "dwi" / f"{STEM}_hemi-{hemi}_desc-CST_tractography.trk"
        points = np.concatenate(list(nib.streamlines.load(str(trk)).streamlines))
        assert np.sign(np.median(points[:, 0])) == sign


def test_outputs_are_bids_derivatives_with_provenance(lesion_run, lesion_phantom):
    out, _, _ = lesion_run
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "cst-integrity"
    dwi = out / "sub-subject01" / "dwi"
    for name in ("_desc-profiles_tractometry.tsv", "_model-tensor_param-fa_dwimap.nii.gz",
                 "_model-tensor_param-md_dwimap.nii.gz", "_hemi-L_desc-CST_tractography.trk",
                 "_hemi-R_desc-CST_tractography.trk"):
        assert (dwi / f"{STEM}{name}").is_file(), name
        sidecar = json.loads((dwi / f"{STEM}{name.split('.')[0]}.json").read_text())
        assert sidecar["GeneratedBy"][0]["Name"] == "cst-integrity"
    with open(dwi / f"{STEM}_desc-profiles_tractometry.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 200
    assert {"tract", "node", "fa", "md", "rd", "ad", "x", "y", "z"} <= set(rows[0])
    left = [r for r in rows if r["tract"] == "CST_L"]
    assert float(left[0]["z"]) < float(left[-1]["z"])  # node 0 at the brainstem end
    metrics = load_metrics(out, STEM)
    provenance = metrics["provenance"]
    assert provenance["software"]["dipy"]
    assert set(provenance["inputs"]) == {"sub-subject01_dwi.nii.gz", "sub-subject01_dwi.bval",
                                         "sub-subject01_dwi.bvec"}
    assert len(metrics["asymmetry"]["fa_ai_profile"]) == 100
    html = (out / f"{STEM}.html").read_text()
    assert "not a medical device" in html.lower()
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"


def test_n_jobs_does_not_change_the_result(lesion_run, three_subjects_at_once):
    """The demo phantom with one job (run beside two other subjects) and with two."""
    two, _, _ = lesion_run
    one, _, _ = three_subjects_at_once
    by_n_jobs = [load_metrics(out, STEM) for out in (one, two)]
    for metrics in by_n_jobs:
        provenance = metrics["provenance"]
        provenance.pop("created")
        provenance["parameters"].pop("n_jobs")
        for source in provenance["inputs"].values():  # the copy's files (same checksums)
            source.pop("path")
    assert by_n_jobs[0] == by_n_jobs[1]
    assert_same_tractograms(one, two)


def test_lesion_free_phantom_reports_no_damage(three_subjects_at_once):
    out, _, truths = three_subjects_at_once
    assert truths["subject02"]["lesion"] is None
    metrics = load_metrics(out, "sub-subject02")
    assert metrics["localization"]["affected_side"] == "none"
    assert metrics["localization"]["umn_damage"] is False
    assert metrics["prognosis"]["category"] == "no_imaging_evidence_of_umn_damage"
    assert abs(metrics["asymmetry"]["fa_ai_tract"]) < 0.02


def test_outputs_load_in_pandas_and_nibabel_and_group_table(lesion_run, lesion_phantom):
    import subprocess
    import sys

    import pandas as pd

    out, _, _ = lesion_run
    bids, _ = lesion_phantom
    dwi = out / "sub-subject01" / "dwi"
    profiles = pd.read_csv(dwi / f"{STEM}_desc-profiles_tractometry.tsv", sep="\t",
                           na_values="n/a")
    assert profiles.groupby("tract").size().to_dict() == {"CST_L": 100, "CST_R": 100}
    assert profiles["fa"].dtype.kind == "f" and profiles["fa"].between(0, 1).all()
    # pyAFQ's column names carry the same numbers.
    assert profiles.groupby("tract")["tractID"].first().to_dict() == {
        "CST_L": "Left Corticospinal", "CST_R": "Right Corticospinal"}
    assert (profiles["nodeID"] == profiles["node"]).all()
    assert np.allclose(profiles["dti_fa"], profiles["fa"])
    assert (profiles["subjectID"].astype(str) == "subject01").all()
    for hemi in ("L", "R"):
        trk = nib.streamlines.load(str(dwi / f"{STEM}_hemi-{hemi}_desc-CST_tractography.trk"))
        assert len(trk.streamlines) > 0 and trk.header["voxel_order"]

    result = subprocess.run(
        [sys.executable, "-c", "from workflows.cli import bids_app_main; bids_app_main()",
         str(bids), str(out), "group"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    group = pd.read_csv(out / "group_desc-cst_metrics.tsv", sep="\t", na_values="n/a")
    assert len(group) == 1
    row = group.iloc[0]
    assert row["participant_id"] == "sub-subject01" and row["affected_side"] == "left"
    assert row["n_streamlines_left"] >= 100
