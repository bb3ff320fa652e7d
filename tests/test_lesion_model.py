"""Radial-diffusivity lesions implanted into a real scan (pipeline.sims.lesion_model)."""

import nibabel as nib
import numpy as np
import pytest
from dipy.reconst.dti import fractional_anisotropy

from pipeline.io.dwi import load_dwi
from pipeline.sims.lesion_model import implant_lesion, radial_increase_for_fa_drop

from .conftest import SHARED_BIDS


@pytest.mark.parametrize("fa_drop", [0.25, 0.5, 0.6])
def test_radial_increase_gives_the_requested_fa(fa_drop):
    evals = np.array([[1.7e-3, 0.3e-3, 0.3e-3], [1.2e-3, 0.6e-3, 0.4e-3],
                      [1.5e-3, 0.5e-3, 0.45e-3]])
    delta = radial_increase_for_fa_drop(evals, fa_drop)
    after = fractional_anisotropy(evals + delta[:, None] * np.array([0, 1, 1]))
    assert np.allclose(after, (1 - fa_drop) * fractional_anisotropy(evals), atol=1e-6)
    assert np.all(delta > 0)


@pytest.mark.realdata
def test_lesion_changes_only_the_sphere_and_lowers_fa_not_ad():
    base = SHARED_BIDS / "sub-toshiba01" / "dwi" / "sub-toshiba01_dwi"
    scan = load_dwi(f"{base}.nii.gz", f"{base}.bval", f"{base}.bvec", check_data=False)
    data = np.asarray(scan.img.dataobj)
    centre = nib.affines.apply_affine(scan.affine, [32, 30, 22])
    lesioned, info = implant_lesion(data, scan.bvals, scan.bvecs_fsl, scan.affine, centre,
                                    radius_mm=6.0, fa_drop=0.5)
    assert lesioned.dtype == data.dtype
    changed = (lesioned != data).any(axis=-1)
    ijk = np.argwhere(changed)
    distance = np.linalg.norm(nib.affines.apply_affine(scan.affine, ijk) - centre, axis=1)
    assert changed.sum() == info["n_voxels"] > 10 and distance.max() <= 6.0
    b0 = scan.bvals <= 50
    assert np.array_equal(lesioned[..., b0], data[..., b0])
    # Noise keeps the fitted FA from halving exactly; axial diffusivity stays.
    assert 0.4 <= 1 - info["fa_after"] / info["fa_before"] <= 0.6, info
    assert abs(info["ad_after"] / info["ad_before"] - 1) < 0.05, info
