"""Memory budget (issue 22): stages that work in chunks give the same result as in one
piece, and their working-memory formulas are upper bounds of what they allocate, within
20 % (measured with tracemalloc, which sees every numpy allocation)."""

import tracemalloc

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from pipeline.io import outputs
from pipeline.memory import estimated_memory_bytes, stage_peak_bytes
from pipeline.preprocessing import denoise, gibbs
from pipeline.reconstruction import fodf, tensor

RNG = np.random.default_rng(22)


def _tensor_series(shape=(40, 40, 20), n_volumes=13):
    """A synthetic single-shell series (b=1000) with noise, its gradients and a brain
    mask of ~70 % of the grid (more voxels than one DIPY step)."""
    bvals = np.r_[0.0, np.full(n_volumes - 1, 1000.0)]
    bvecs = RNG.normal(size=(n_volumes, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1)[:, None]
    bvecs[0] = 0
    diffusivity = RNG.uniform(0.3e-3, 1.5e-3, shape + (1,))
    data = 1000 * np.exp(-bvals * diffusivity) + RNG.normal(0, 20, shape + (n_volumes,))
    mask = RNG.random(shape) < 0.7
    return np.abs(data).astype(np.float32), bvals, bvecs, mask


def _traced_peak(function, *args, **kwargs):
    """Peak bytes allocated while ``function`` runs (beyond what existed before), on its
    second call: the first loads Numba's compiled kernels and imports, which tracemalloc
    would count too."""
    function(*args, **kwargs)
    tracemalloc.start()
    try:
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tensor_maps_do_not_depend_on_the_work_units():
    """Work units sized from a budget, and workers, change nothing, to the bit; the maps
    are DIPY's fit of the whole volume in one piece."""
    data, bvals, bvecs, mask = _tensor_series()
    assert mask.sum() > 2 * tensor.TENSOR_FIT_STEP
    tight = 1  # the smallest units: one DIPY step each
    assert tensor.tensor_chunk_voxels(13, memory_bytes=tight) == tensor.TENSOR_FIT_STEP
    whole = tensor.fit_dti(data, bvals, bvecs, np.eye(4), mask, b0_threshold=50)
    for n_jobs, budget in ((1, tight), (2, tight), (2, None)):
        chunked = tensor.fit_dti(data, bvals, bvecs, np.eye(4), mask, b0_threshold=50,
                                     n_jobs=n_jobs, memory_bytes=budget)
        for name in whole:
            np.testing.assert_array_equal(chunked[name], whole[name])
    # bvecs here are in the voxel frame already (identity affine, x not flipped: see
    # pipeline.io.dwi.fsl_bvecs_to_voxel_frame), so compare in the frame fit_dti used
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs * [-1, 1, 1])).fit(data, mask=mask)
    np.testing.assert_array_equal(whole["fa"][mask],
                                  np.clip(np.nan_to_num(fit.fa), 0, 1)[mask].astype(np.float32))
    assert not whole["fa"][~mask].any()


def test_gibbs_batches_change_nothing():
    """Each image is corrected on its own: batches of 32 made as the workers ask, in place
    or into a copy, on one or two workers, equal one image at a time."""
    data = RNG.normal(100, 10, (24, 20, 6, 7)).astype(np.float32)
    data[6:18, 5:15] += 400  # edges that ring
    mask = np.zeros(data.shape[:3], dtype=bool)
    mask[8:16, 6:14, 1:5] = True
    result = gibbs.remove_gibbs_ringing(data, mask, n_jobs=1)
    in_place = data.copy()
    assert gibbs.remove_gibbs_ringing(in_place, mask, n_jobs=2, overwrite=True) is in_place
    np.testing.assert_array_equal(in_place, result)
    grown = np.moveaxis(gibbs.binary_dilation(mask, iterations=gibbs.MASK_MARGIN), 2, 0)
    shifts = np.linspace(*gibbs.SHIFT_RANGE, num=20, dtype=np.float32)
    for k in np.flatnonzero(grown.any(axis=(1, 2))):
        for volume in range(data.shape[3]):
            alone = gibbs._remove_ringing_2d(data[None, :, :, k, volume], grown[None, k],
                                             shifts, 3)
            np.testing.assert_array_equal(result[:, :, k, volume], alone[0])


@pytest.mark.parametrize("n_volumes", [13, 40])
def test_tensor_working_memory_is_a_tight_upper_bound(n_volumes):
    data, bvals, bvecs, mask = _tensor_series(n_volumes=n_volumes)
    budget = 12 * 2 ** 20  # units of about one DIPY step
    outputs = 7 * 4 * mask.size  # the float32 maps
    measured = _traced_peak(tensor.fit_dti, data, bvals, bvecs, np.eye(4), mask,
                            b0_threshold=50, memory_bytes=budget) - outputs
    estimate = tensor.tensor_working_bytes(int(mask.sum()), n_volumes, memory_bytes=budget)
    assert measured <= estimate <= 1.2 * measured


def test_gibbs_working_memory_is_a_tight_upper_bound():
    data = RNG.normal(100, 10, (96, 96, 4, 16)).astype(np.float32)
    measured = _traced_peak(gibbs.remove_gibbs_ringing, data)
    measured -= data.nbytes  # its output
    estimate = gibbs.gibbs_working_bytes(data.shape)
    assert measured <= estimate <= 1.2 * measured


def test_the_run_estimate_is_its_largest_stage_and_its_processes():
    shape = (96, 96, 60, 65)
    stages = stage_peak_bytes(shape, input_itemsize=2, n_jobs=2)
    series = 4 * np.prod(shape)
    assert all(peak >= series for name, peak in stages.items() if name != "track_cst")
    assert estimated_memory_bytes(shape, input_itemsize=2, n_jobs=2) > max(stages.values())
    # a budget never raises the estimate: it only makes chunks smaller
    assert estimated_memory_bytes(shape, input_itemsize=2, n_jobs=2, memory_bytes=2 ** 30) \
        <= estimated_memory_bytes(shape, input_itemsize=2, n_jobs=2)


def test_csd_on_chosen_volumes_equals_csd_on_their_copy():
    """Leaving volumes out through ``volumes`` (no copy of the series) fits what a copy of
    the kept volumes gives, to the bit."""
    data, bvals, bvecs, mask = _tensor_series(shape=(12, 12, 6), n_volumes=31)
    maps = tensor.fit_dti(data, bvals, bvecs, np.eye(4), mask, b0_threshold=50)
    keep = np.ones(len(bvals), dtype=bool)
    keep[[4, 11]] = False
    fit_mask = mask.copy()
    fit_mask[:, :, 3:] = False
    common = dict(b0_threshold=50, shell=1000, sh_order=4, fit_mask=fit_mask)
    copied = fodf.fit_csd(data[..., keep], bvals[keep], bvecs[keep], np.eye(4), mask,
                          maps["fa"], **common)
    chosen = fodf.fit_csd(data, bvals, bvecs, np.eye(4), mask, maps["fa"], volumes=keep,
                          **common)
    np.testing.assert_array_equal(chosen[0], copied[0])
    assert chosen[1] == copied[1]


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_mppca_written_slab_by_slab_equals_the_denoised_series(n_jobs):
    """Denoising handed out in slabs of whole slices (never the series twice) gives the
    series denoise_dwi returns, to the bit, and leaves the input as it was."""
    data, bvals, _, _ = _tensor_series(shape=(20, 18, 24), n_volumes=13)
    mask = np.zeros(data.shape[:3], dtype=bool)
    mask[4:16, 3:15, 5:19] = True
    expected, expected_sigma = denoise.denoise_dwi(data, mask, bvals, n_jobs=n_jobs)
    written = np.full(data.shape, np.nan, dtype=np.float32)

    def write_slices(z_start, block):
        written[:, :, z_start:z_start + block.shape[2]] = block

    measured = data.copy()
    none, sigma = denoise.denoise_dwi(data, mask, bvals, n_jobs=n_jobs,
                                      memory_bytes=1, write_slices=write_slices)
    assert none is None
    np.testing.assert_array_equal(written, expected)
    np.testing.assert_array_equal(sigma, expected_sigma)
    np.testing.assert_array_equal(data, measured)


def test_nifti_written_by_blocks_is_the_file_save_nifti_writes(tmp_path):
    affine = np.diag([1.7, -1.7, 2.5, 1.0])
    affine[:3, 3] = [-100, 110, -60]
    series = RNG.random((5, 6, 7, 4)).astype(np.float32)
    outputs.save_nifti(tmp_path / "whole.nii", series, affine)
    with outputs.nifti_volume_writer(tmp_path / "blocks.nii", series.shape, affine) as writer:
        writer.volume(3, series[..., 3])
        writer.slices(0, series[:, :, :4, :3])
        writer.slices(4, series[:, :, 4:, :3])
    assert (tmp_path / "blocks.nii").read_bytes() == (tmp_path / "whole.nii").read_bytes()
