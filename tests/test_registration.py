"""Template registration: our threaded SyN is DIPY's SyN, bit for bit."""

import nibabel as nib
import numpy as np
import pytest
from dipy.align import syn_registration
from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
from dipy.align.metrics import CCMetric
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

import atlases
from pipeline.reconstruction.registration import SYN_LEVEL_ITERS, SYN_STEP_LENGTH, ThreadedSyN


@pytest.fixture(scope="module")
def template_and_warped():
    """The bundled FA template at 4 mm, and a smoothly deformed, shifted copy of it."""
    img = nib.load(atlases.template_fa_path())
    static = zoom(np.asarray(img.dataobj, dtype=np.float64), 0.5, order=1)
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(3)
    grid = np.indices(static.shape, dtype=np.float64)
    field = np.stack([gaussian_filter(rng.normal(size=static.shape), 4) * 40 for _ in range(3)])
    moving = map_coordinates(static, grid + field + np.array([1.5, -1.0, 0.5])[:, None, None, None],
                             order=1)
    return static, moving, affine


def test_dipy_still_has_the_private_step_we_override():
    # If DIPY renames it, ThreadedSyN silently falls back to DIPY's serial inversions.
    assert hasattr(SymmetricDiffeomorphicRegistration,
                   "_SymmetricDiffeomorphicRegistration__invert_models")


@pytest.mark.parametrize("n_threads", [1, 2])
def test_threaded_syn_equals_dipy_syn_registration(template_and_warped, n_threads):
    static, moving, affine = template_and_warped
    _, expected = syn_registration(moving, static, moving_affine=affine, static_affine=affine,
                                   level_iters=list(SYN_LEVEL_ITERS),
                                   step_length=SYN_STEP_LENGTH)
    calls = []

    class Counting(ThreadedSyN):
        def _invert_model(self, model, world2grid, spacing):
            calls.append(model)
            super()._invert_model(model, world2grid, spacing)

    mapping = Counting(CCMetric(3), level_iters=list(SYN_LEVEL_ITERS),
                       step_length=SYN_STEP_LENGTH, n_threads=n_threads).optimize(
        static, moving, static_grid2world=affine, moving_grid2world=affine)
    assert len(calls) > 0  # our inversion ran, not DIPY's own
    # The deformation is real: the fields are far from zero ...
    assert np.abs(expected.forward).max() > 1.0
    # ... and ours are DIPY's exactly.
    np.testing.assert_array_equal(mapping.forward, expected.forward)
    np.testing.assert_array_equal(mapping.backward, expected.backward)
