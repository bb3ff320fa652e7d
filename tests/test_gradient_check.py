"""Gradient-table check: real scans with their .bvec tables flipped or permuted in memory.

Every run with brain coverage must keep its own table (no false alarm) and undo each axis
flip and each axis permutation applied to it.  Synthetic tensors check the FSL <-> voxel
frame handling of the candidate corrections for both signs of the affine determinant.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.io.dwi import fsl_bvecs_to_voxel_frame, load_dwi
from pipeline.preprocessing.gradient_check import (
    AS_GIVEN,
    candidate_corrections,
    check_gradient_table,
    correction_in_voxel_frame,
)
from pipeline.preprocessing.mask import brain_mask, mean_b0
from pipeline.reconstruction.tensor import fit_dti

from .conftest import SHARED_BIDS

#: Runs with brain coverage (subject, BIDS file stem).
RUNS = ("sub-philips01", "sub-philips02", "sub-siemens01", "sub-siemens02",
        "sub-siemens03_dir-AP", "sub-siemens03_dir-PA", "sub-toshiba01", "sub-uih01")
#: The table errors a user could make: each axis sign flip, each non-identity permutation.
CORRUPTIONS = ("flip x", "flip y", "flip z", "swap x-y", "swap y-z", "swap x-z",
               "permute x-y-z -> y-z-x", "permute x-y-z -> z-x-y")
B0_THRESHOLD = 50.0  # covers sub-uih01's b0 stored as b=1.25


def _load_run(stem):
    """(data float32 (X, Y, Z, N), bvals, FSL bvecs, affine, brain mask) of one real run."""
    subject = stem.split("_")[0]
    image = SHARED_BIDS / subject / "dwi" / f"{stem}_dwi.nii.gz"
    base = str(image)[:-len(".nii.gz")]
    scan = load_dwi(image, f"{base}.bval", f"{base}.bvec", b0_threshold=B0_THRESHOLD)
    data = scan.img.get_fdata(dtype=np.float32)
    mask = brain_mask(mean_b0(data, scan.b0_mask))
    return data, scan.bvals, scan.bvecs_fsl, scan.affine, mask


def _check(run, bvecs_fsl):
    data, bvals, _, affine, mask = run
    return check_gradient_table(data, bvals, bvecs_fsl, affine, mask, b0_threshold=B0_THRESHOLD)


def _undoing(corruption):
    """Label of the candidate that undoes ``corruption`` (its inverse, up to a global sign)."""
    candidates = candidate_corrections()
    inverse = candidates[corruption].T  # signed permutations are orthogonal
    return next(label for label, m in candidates.items()
                if np.allclose(m, inverse) or np.allclose(m, -inverse))


@pytest.fixture(scope="module", params=RUNS)
def run(request):
    """One real run, loaded once for all the tests of this module that use it."""
    return _load_run(request.param)


@pytest.mark.realdata
@pytest.mark.slow
def test_every_run_with_brain_coverage_is_tested():
    found = {p.name[:-len("_dwi.nii.gz")] for p in SHARED_BIDS.glob("sub-*/dwi/*_dwi.nii.gz")}
    assert found == set(RUNS), "add new runs to RUNS (or explain why they are left out)"


@pytest.mark.realdata
@pytest.mark.slow
def test_table_as_given_is_kept(run):
    _, _, bvecs_fsl, _, _ = run
    result = _check(run, bvecs_fsl)
    assert result.correction is None, result.scores
    np.testing.assert_array_equal(result.matrix, np.eye(3))
    np.testing.assert_array_equal(result.corrected_bvecs_fsl, bvecs_fsl)
    assert result.score_after == result.score_before == result.scores[AS_GIVEN] > 0
    assert len(result.scores) == 24
    # The vendors' tables are the most coherent of all 24, not merely within the margin.
    assert max(result.scores, key=result.scores.get) == AS_GIVEN, result.scores


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_flipped_or_permuted_table_is_undone(run, corruption):
    _, _, bvecs_fsl, _, _ = run
    wrong = bvecs_fsl @ candidate_corrections()[corruption].T
    result = _check(run, wrong)
    assert result.correction == _undoing(corruption), result.scores
    assert result.score_after > result.score_before
    # The corrected table is the original one (a global sign is the same table for a tensor).
    sign = np.sign(np.sum(result.corrected_bvecs_fsl * bvecs_fsl))
    np.testing.assert_allclose(result.corrected_bvecs_fsl, sign * bvecs_fsl, atol=1e-12)
    np.testing.assert_allclose(result.corrected_bvecs_fsl, wrong @ result.matrix.T)


@pytest.mark.realdata
@pytest.mark.slow
def test_positive_determinant_storage_keeps_the_same_bvec_file():
    """The same scan stored with its x axis reversed (det > 0): FSL's convention leaves the
    .bvec file unchanged, and a swap involving x must still be undone as stated on its rows
    (a voxel-frame slip would answer 'swap x-y, flip z' instead)."""
    data, bvals, bvecs_fsl, affine, mask = _load_run("sub-toshiba01")
    reverse_x = np.diag([-1.0, 1, 1, 1])
    reverse_x[0, 3] = data.shape[0] - 1
    run = (data[::-1], bvals, bvecs_fsl, affine @ reverse_x, mask[::-1])
    assert np.linalg.det(run[3][:3, :3]) > 0
    assert _check(run, bvecs_fsl).correction is None
    for corruption in ("swap x-y", "permute x-y-z -> y-z-x"):
        wrong = bvecs_fsl @ candidate_corrections()[corruption].T
        assert _check(run, wrong).correction == _undoing(corruption)


def test_candidates_are_the_24_distinct_signed_permutations():
    candidates = candidate_corrections()
    assert list(candidates)[0] == AS_GIVEN and len(candidates) == 24
    canonical = set()
    for m in candidates.values():
        assert np.array_equal(np.abs(m).sum(axis=0), np.ones(3))
        assert np.array_equal(np.abs(m).sum(axis=1), np.ones(3))
        canonical.add(tuple((m * np.sign(np.linalg.det(m))).ravel()))  # antipodal pairs
    assert len(canonical) == 24
    # Labels read on the .bvec rows: permutation first, then the flip of a resulting row.
    rows = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(rows @ candidates["swap x-y, flip z"].T, [[2, 1, -3]])
    np.testing.assert_array_equal(rows @ candidates["permute x-y-z -> y-z-x"].T, [[2, 3, 1]])
    np.testing.assert_array_equal(rows @ candidates["swap x-z, flip x"].T, [[-3, 2, 1]])


def _synthetic_tensor_scan(affine, n_voxels=40, seed=0):
    """Noiseless signal of random prolate tensors, with the FSL b-vectors for ``affine``."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(30, 3))
    bvecs_voxel = np.vstack([np.zeros(3), directions / np.linalg.norm(directions, axis=1,
                                                                      keepdims=True)])
    bvals = np.r_[0.0, np.full(30, 1000.0)]
    rotations = Rotation.random(n_voxels, random_state=seed).as_matrix()
    tensors = rotations @ np.diag([1.7e-3, 0.4e-3, 0.2e-3]) @ rotations.transpose(0, 2, 1)
    adc = np.einsum("ni,vij,nj->vn", bvecs_voxel, tensors, bvecs_voxel)
    data = (1000.0 * np.exp(-bvals * adc)).reshape(n_voxels, 1, 1, -1)
    # The voxel-frame table written the FSL way (the flip is its own inverse).
    return data, bvals, fsl_bvecs_to_voxel_frame(bvecs_voxel, affine)


@pytest.mark.parametrize("x_sign", [1.0, -1.0], ids=["det>0", "det<0"])
def test_candidate_direction_shortcut_matches_a_refit(x_sign):
    """M applied to the .bvec rows moves the fitted principal direction by S M S."""
    affine = np.diag([2.0 * x_sign, 2.0, 2.0, 1.0])
    data, bvals, bvecs_fsl = _synthetic_tensor_scan(affine)
    mask = np.ones(data.shape[:3], dtype=bool)
    v1 = fit_dti(data, bvals, bvecs_fsl, affine, mask, b0_threshold=B0_THRESHOLD,
                 fit_method="OLS")["v1"].reshape(-1, 3)
    for label, matrix in candidate_corrections().items():
        refit = fit_dti(data, bvals, bvecs_fsl @ matrix.T, affine, mask,
                        b0_threshold=B0_THRESHOLD, fit_method="OLS")["v1"].reshape(-1, 3)
        shortcut = v1 @ correction_in_voxel_frame(matrix, affine).T
        cosines = np.abs(np.sum(refit * shortcut, axis=1))
        assert cosines.min() > 0.9999, label


@pytest.mark.realdata
@pytest.mark.slow
def test_check_turns_the_principal_direction_of_the_tensor_fitted_first(tmp_path):
    """The pipeline fits the tensor with the table as given and checks the table beside the
    registration: for a swapped table, the checked principal direction must be the one a
    fit with the right table gives, and FA must not depend on the swap at all."""
    from pipeline.steps import brain_mask as mask_step
    from pipeline.steps import check_gradients, fit_tensor

    base = SHARED_BIDS / "sub-philips01" / "dwi" / "sub-philips01_dwi"
    dwi, bval, bvec = (f"{base}.nii.gz", f"{base}.bval", f"{base}.bvec")
    wrong = tmp_path / "swapped.bvec"
    np.savetxt(wrong, candidate_corrections()["swap x-y"] @ np.loadtxt(bvec), fmt="%.8f")
    mask = mask_step(dwi, bval, bvec, out_dir=tmp_path)["mask"]
    outliers = tmp_path / "outliers.json"
    outliers.write_text('{"excluded": []}')

    def run(name, table, **check):
        out = tmp_path / name
        out.mkdir()
        maps = fit_tensor(dwi, bval, table, mask, outliers, out_dir=out, n_jobs=2)
        checked = check_gradients(dwi, bval, table, mask, outliers, maps["v1"], out_dir=out,
                                  b0_threshold=B0_THRESHOLD, **check)
        return maps, checked

    right_maps, right_check = run("right", bvec)
    wrong_maps, wrong_check = run("wrong", wrong)
    assert right_check["v1"] == right_maps["v1"]  # kept table: the fit's own file
    assert wrong_check["v1"] != wrong_maps["v1"]
    assert json.loads(Path(wrong_check["qc"]).read_text())["correction"] == "swap x-y"

    def image(path):
        return np.asarray(nib.load(path).dataobj)

    np.testing.assert_allclose(image(wrong_maps["fa"]), image(right_maps["fa"]), atol=1e-5)
    white_matter = image(right_maps["fa"]) > 0.3
    cosines = np.abs(np.sum(image(wrong_check["v1"]) * image(right_maps["v1"]), axis=-1))
    assert np.percentile(cosines[white_matter], 1) > 0.999
    # Before the turn, the swapped table's direction is wrong in most white matter.
    before = np.abs(np.sum(image(wrong_maps["v1"]) * image(right_maps["v1"]), axis=-1))
    assert np.median(before[white_matter]) < 0.9
    _, skipped = run("off", wrong, mode="off")
    assert skipped["v1"] == str(tmp_path / "off" / "v1.nii.gz")
