"""Combining runs: a second run of a real scan with the head moved by a known rigid transform."""

import numpy as np
import pytest
from dipy.align.imaffine import AffineMap

from pipeline.io.dwi import load_dwi
from pipeline.preprocessing.combine import combine_runs, rigid_parameters
from pipeline.preprocessing.mask import mean_b0

from .conftest import SHARED_BIDS, load_metrics, run_cst_report

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _rotation_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_moved_second_run_is_aligned_and_its_bvecs_rotated_back():
    base = SHARED_BIDS / "sub-toshiba01" / "dwi" / "sub-toshiba01_dwi"
    scan = load_dwi(f"{base}.nii.gz", f"{base}.bval", f"{base}.bvec")
    data = scan.img.get_fdata(dtype=np.float32)
    affine = scan.affine
    # The head turns by Q about the brain centre and shifts: the second run sees the tissue
    # moved, and (scanner-fixed gradients) its b-vectors are the first run's turned by Q.
    centre = affine[:3, :3] @ (np.array(data.shape[:3]) / 2) + affine[:3, 3]
    q = _rotation_z(6.0)
    head_motion = np.eye(4)
    head_motion[:3, :3] = q
    head_motion[:3, 3] = centre - q @ centre + np.array([2.0, -3.0, 1.5])
    # A point p of the first run sits at head_motion @ p in the second: sample the first run
    # at head_motion^-1 @ x to image the second.
    moved = AffineMap(np.linalg.inv(head_motion), domain_grid_shape=data.shape[:3],
                      domain_grid2world=affine, codomain_grid_shape=data.shape[:3],
                      codomain_grid2world=affine)
    second = np.stack([moved.transform(data[..., v]) for v in range(data.shape[-1])], -1)
    # FSL b-vectors → world (written out here, independently of pipeline.io.dwi): undo FSL's x
    # flip for a positive determinant, then apply the affine's unit axes.
    fsl_flip = np.diag([-1.0 if np.linalg.det(affine[:3, :3]) > 0 else 1.0, 1, 1])
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    to_world = axes @ fsl_flip
    second_bvecs = scan.bvecs_fsl @ to_world.T @ q.T @ np.linalg.inv(to_world).T
    runs = [{"data": data, "bvals": scan.bvals, "bvecs_fsl": scan.bvecs_fsl, "affine": affine,
             "b0": mean_b0(data, scan.b0_mask)},
            {"data": second, "bvals": scan.bvals, "bvecs_fsl": second_bvecs, "affine": affine,
             "b0": mean_b0(second, scan.b0_mask)}]
    combined, bvals, bvecs, transforms = combine_runs(runs)
    n = data.shape[-1]
    assert combined.shape == data.shape[:3] + (2 * n,)
    np.testing.assert_array_equal(bvals, np.concatenate([scan.bvals, scan.bvals]))
    # The estimated transform is the head motion (reference world → second run's world).
    translation, angles = rigid_parameters(transforms[1])
    true_translation, true_angles = rigid_parameters(head_motion)
    assert np.abs(angles - true_angles).max() < 0.5
    assert np.linalg.norm(translation - true_translation) < 0.5
    # b-vectors of the second run come back to the first run's, within half a degree.
    weighted = scan.bvals > 50
    cosines = np.abs(np.sum(bvecs[n:][weighted] * scan.bvecs_fsl[weighted], axis=1))
    assert np.degrees(np.arccos(np.clip(cosines, -1, 1))).max() < 0.5
    # and its images land on the first run's (inside the brain, away from the resampled edge).
    brain = runs[0]["b0"] > np.percentile(runs[0]["b0"], 75)
    r = np.corrcoef(combined[..., n:][brain].ravel(), data[brain].ravel())[0, 1]
    assert r > 0.95


def test_combine_runs_option_reports_one_series(tmp_path):
    """sub-siemens03 has dir-AP and dir-PA runs: --combine-runs gives one report of both."""
    out = tmp_path / "out"
    result = run_cst_report("siemens03", SHARED_BIDS, out, "--n-jobs", "2", "--combine-runs")
    assert result.returncode in (0, 3), result.stderr
    metrics = load_metrics(out, "sub-siemens03")
    assert metrics["entities"] == {"sub": "siemens03"}
    combined = metrics["qc"]["combined_runs"]
    assert combined["n_volumes"] == [21, 21]
    # AP and PA runs of one session: the head barely moved between them.
    assert np.abs(combined["runs"][1]["translation_mm"]).max() < 5
    assert metrics["qc"]["preprocessing"]["tensor"]["n_volumes"] == 42 - len(
        metrics["qc"]["outliers"]["excluded"])
    assert len(metrics["provenance"]["inputs"]) == 6
    assert not list((out / "sub-siemens03" / "dwi").glob("*dir-*"))
