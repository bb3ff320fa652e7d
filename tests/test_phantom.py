"""Tests of the synthetic CST phantom (pipeline/sims/phantom.py)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.sims.phantom import fsl_bvecs_to_world, make_phantom_dataset

LESION = {"side": "left", "level": "internal_capsule", "radius_mm": 6.0, "fa_drop": 0.5}


def _load(bids, label):
    stem = bids / f"sub-{label}" / "dwi" / f"sub-{label}_dwi"
    img = nib.load(str(stem) + ".nii.gz")
    bvals = np.loadtxt(str(stem) + ".bval")
    bvecs = np.loadtxt(str(stem) + ".bvec")
    phantom = bids / "sourcedata" / "phantom"
    cst = np.asarray(nib.load(phantom / f"sub-{label}_desc-cst_dseg.nii.gz").dataobj)
    les = np.asarray(nib.load(phantom / f"sub-{label}_desc-lesion_mask.nii.gz").dataobj)
    return img, bvals, bvecs, cst, les


def _fit(img, bvals, bvecs, mask):
    """DTI fit restricted to ``mask``; bvecs converted FSL -> voxel frame (flip x iff det>0)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    v = np.array(bvecs, float)
    if np.linalg.det(img.affine[:3, :3]) > 0:
        v[0] *= -1
    gtab = gradient_table(bvals, bvecs=v.T, b0_threshold=50)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    data = np.asarray(img.dataobj[sl], dtype=np.float32)
    fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask[sl])
    fa = np.zeros(mask.shape)
    evec = np.zeros(mask.shape + (3,))
    fa[sl] = fit.fa
    evec[sl] = fit.evecs[..., :, 0]
    return fa, evec


@pytest.fixture(scope="module")
def lesion_ds(tmp_path_factory):
    bids = tmp_path_factory.mktemp("bids_lesion")
    truth = make_phantom_dataset(bids, subject="phant01", lesion=dict(LESION), seed=0)
    return bids, truth


@pytest.fixture(scope="module")
def healthy_ds(tmp_path_factory):
    bids = tmp_path_factory.mktemp("bids_healthy")
    truth = make_phantom_dataset(bids, subject="phant02", lesion=None, seed=1)
    return bids, truth


def test_bids_layout(lesion_ds):
    bids, truth = lesion_ds
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["Name"] == "CST phantom (synthetic)"
    assert "sub-phant01" in (bids / "participants.tsv").read_text()
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        assert (bids / "sub-phant01" / "dwi" / f"sub-phant01_dwi{ext}").is_file()
    sidecar = json.loads((bids / "sub-phant01" / "dwi" / "sub-phant01_dwi.json").read_text())
    assert sidecar["Synthetic"] is True
    gt = json.loads((bids / "sourcedata" / "phantom" / "sub-phant01_groundtruth.json").read_text())
    assert gt["lesion"]["side"] == "left" and gt["lesion"]["level"] == "internal_capsule"
    assert gt == json.loads(json.dumps(truth))
    size = sum(p.stat().st_size for p in bids.rglob("*") if p.is_file())
    assert size < 30e6


def test_gradient_table_and_orientation(lesion_ds):
    bids, truth = lesion_ds
    img, bvals, bvecs, _, _ = _load(bids, "phant01")
    assert img.ndim == 4 and img.shape[3] == len(bvals) == bvecs.shape[1] == truth["n_volumes"]
    assert bvecs.shape[0] == 3
    assert np.sum(bvals == 0) >= 1 and np.sum(bvals == 1000) == 30
    norms = np.linalg.norm(bvecs[:, bvals > 0], axis=0)
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert np.linalg.det(img.affine[:3, :3]) < 0


def test_lesion_truth_values(lesion_ds):
    _, truth = lesion_ds
    les = truth["lesion"]
    assert les["fa_after"] == pytest.approx(les["fa_before"] * (1 - LESION["fa_drop"]), rel=0.02)
    assert les["fa_after"] > 0.25
    assert les["centre_ras_mm"][0] < 0  # left lesion in a left hemisphere (world x < 0)


def _tangent_cosines(img, evec_vox, cst, les, truth, side, k):
    """|cos| between the world-frame principal eigenvector and the true curve tangent."""
    rot = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    m = (cst == k) & (les == 0)
    xyz = nib.affines.apply_affine(img.affine, np.argwhere(m))
    e_world = evec_vox[m] @ rot.T
    pts = np.array(truth["curves"][side]["points_ras_mm"])
    tan = np.gradient(pts, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    nearest = np.argmin(np.linalg.norm(xyz[:, None, :] - pts[None], axis=-1), axis=1)
    return np.abs(np.sum(e_world * tan[nearest], axis=1)), xyz


def test_lesion_fa_drop_and_directions(lesion_ds):
    bids, truth = lesion_ds
    img, bvals, bvecs, cst, les = _load(bids, "phant01")
    fa, evec_vox = _fit(img, bvals, bvecs, cst > 0)

    for k, side in ((1, "L"), (2, "R")):
        cos, xyz = _tangent_cosines(img, evec_vox, cst, les, truth, side, k)
        assert np.median(cos) > 0.9, (side, np.median(cos))
        # the CST curves are mostly vertical, so a mirrored x still gives a high median;
        # the 10th percentile is what separates right (~0.999) from mirrored (~0.76)
        assert np.percentile(cos, 10) > 0.95, (side, np.percentile(cos, 10))
        # the tube lies on the correct side of the world midline (MNI x = 0)
        assert (xyz[:, 0].mean() < truth["origin_shift_mm"][0]) == (side == "L")

    # lesion FA vs the same z-range of the other CST
    lesion_vox = (les > 0) & (cst == 1)
    zs = np.argwhere(lesion_vox)[:, 2]
    other = (cst == 2) & np.isin(np.indices(cst.shape)[2], np.unique(zs))
    fa_les = fa[lesion_vox].mean()
    fa_con = fa[other].mean()
    rel_drop = 1 - fa_les / fa_con
    assert rel_drop == pytest.approx(LESION["fa_drop"], abs=0.1), (fa_les, fa_con)
    assert fa_les > 0.25
    # outside the lesion the left CST keeps its FA
    assert fa[(cst == 1) & (les == 0)].mean() == pytest.approx(fa[cst == 2].mean(), abs=0.03)


def test_mirrored_bvecs_are_detected(lesion_ds):
    """Negative control: bvecs with x mirrored must fail the tangent check."""
    bids, truth = lesion_ds
    img, bvals, bvecs, cst, les = _load(bids, "phant01")
    g = fsl_bvecs_to_world(bvecs, img.affine)  # LAS image: world x = -bvec x
    assert np.allclose(g[:, 0], -bvecs[0]) and np.allclose(g[:, 1:], bvecs[1:].T)
    wrong = bvecs.copy()
    wrong[0] *= -1
    _, evec_vox = _fit(img, bvals, wrong, cst == 1)
    cos, _ = _tangent_cosines(img, evec_vox, cst, les, truth, "L", 1)
    assert np.percentile(cos, 10) < 0.9


def test_healthy_symmetric(healthy_ds):
    bids, truth = healthy_ds
    assert truth["lesion"] is None
    img, bvals, bvecs, cst, les = _load(bids, "phant02")
    assert not les.any()
    fa, _ = _fit(img, bvals, bvecs, cst > 0)
    fa_l = fa[cst == 1].mean()
    fa_r = fa[cst == 2].mean()
    assert abs(fa_l - fa_r) < 0.02, (fa_l, fa_r)
    assert 0.6 < fa_l < 0.8


def test_multi_shell_phantom_has_each_shell_with_the_directions(tmp_path):
    from pipeline.reconstruction import fodf

    truth = make_phantom_dataset(tmp_path, subject="phant03", lesion=None, seed=2,
                                 n_directions=30, bvalues=(1000.0, 2500.0))
    img, bvals, bvecs, cst, _ = _load(tmp_path, "phant03")
    assert truth["bvalues"] == [0.0, 1000.0, 2500.0] and img.shape[3] == 3 + 2 * 30
    assert np.array_equal(bvecs[:, bvals == 1000.0], bvecs[:, bvals == 2500.0])
    choice = fodf.choose_model(bvals, bvecs.T, 50.0, requested="csd")
    assert (choice["csd_kind"], choice["shells"], choice["directions_per_shell"]) == (
        "msmt", [1000.0, 2500.0], [30, 30])
    # the tube's signal falls with b as the tensor's: across the fibre, exp(-b λ⊥)
    data = np.asarray(img.dataobj, dtype=np.float32)
    inside = data[cst > 0]
    low, high = inside[:, bvals == 1000.0].mean(), inside[:, bvals == 2500.0].mean()
    assert high < 0.75 * low
