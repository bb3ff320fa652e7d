"""The tracking model chosen from the acquisition (pipeline/fodf.py, pipeline.steps.fit_fodf)."""

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.data import get_sphere

from pipeline import fodf, steps
from pipeline.errors import InputError


def _table(n_dirs, bvalue=1000.0, n_b0=2, repeats=1):
    dirs = get_sphere(name="repulsion200").vertices[:n_dirs]
    bvecs = np.r_[np.zeros((n_b0, 3)), np.tile(dirs, (repeats, 1))]
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs * repeats, bvalue)]
    return bvals, bvecs


@pytest.mark.parametrize("n_dirs, order", [(12, None), (15, None), (16, 4), (27, 4), (28, 6),
                                           (44, 6), (45, 8), (64, 8)])
def test_order_follows_the_number_of_directions(n_dirs, order):
    bvals, bvecs = _table(n_dirs)
    choice = fodf.choose_model(bvals, bvecs, 50.0)
    assert choice["n_directions"] == n_dirs and choice["sh_order"] == order
    assert choice["model"] == ("dti" if order is None else "csd")
    assert choice["reason"]


def test_repeated_directions_count_once_and_the_richest_shell_is_used():
    low, low_vecs = _table(20, bvalue=1000.0, repeats=2)   # 20 directions, twice
    high, high_vecs = _table(30, bvalue=2000.0, n_b0=0)
    choice = fodf.choose_model(np.r_[low, high], np.r_[low_vecs, high_vecs], 50.0)
    assert (choice["shell_bvalue"], choice["n_directions"], choice["sh_order"]) == (2000.0, 30, 6)


def test_dti_when_asked_even_with_many_directions():
    bvals, bvecs = _table(64)
    assert fodf.choose_model(bvals, bvecs, 50.0, requested="dti")["model"] == "dti"


def test_csd_on_too_few_directions_is_an_input_error(tmp_path):
    bvals, bvecs = _table(12)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.full((32, 32, 20, len(bvals)), 100.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "dwi.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", bvecs.T, fmt="%.6f")
    (tmp_path / "outliers.json").write_text(json.dumps({"excluded": []}))
    args = [tmp_path / "dwi.nii.gz", tmp_path / "dwi.bval", tmp_path / "dwi.bvec", None, None,
            None, tmp_path / "outliers.json"]
    with pytest.raises(InputError, match="only 12 distinct directions"):
        steps.fit_fodf(*args, out_dir=tmp_path, model="csd")
    out = steps.fit_fodf(*args, out_dir=tmp_path, model="auto")
    assert out["sh"] is None
    assert json.loads(open(out["qc"]).read())["model"] == "dti"


def test_response_mask_falls_back_to_the_most_anisotropic_voxels():
    fa = np.linspace(0.0, 0.6, 1000).reshape(10, 10, 10)  # nothing reaches FA 0.7
    chosen = fodf.response_mask(fa, np.ones(fa.shape, dtype=bool))
    assert chosen.sum() == fodf.MIN_RESPONSE_VOXELS
    assert fa[chosen].min() >= np.sort(fa, axis=None)[-fodf.MIN_RESPONSE_VOXELS]


def test_search_box_covers_the_rois_with_a_margin():
    rois = np.zeros((40, 40, 40), dtype=np.int16)
    rois[10, 12, 14] = 3
    rois[20, 25, 30] = 1
    box = steps.cst_search_box(rois, np.diag([2.0, 2.0, 2.0, 1.0]), margin_mm=4.0)
    idx = np.argwhere(box)
    assert idx.min(axis=0).tolist() == [8, 10, 12] and idx.max(axis=0).tolist() == [22, 27, 32]
