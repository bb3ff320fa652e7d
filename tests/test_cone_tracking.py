"""The cone-restricted probabilistic tracker against DIPY's probabilistic model.

Whole-streamline behaviour (through a crossing, identical for any n_jobs, on
Dask) is tested with the other trackers in ``test_tracking_units.py`` and
``test_slurm_dask.py``; here, the pieces that must equal DIPY's step by step.
"""

import numpy as np
import pytest
from dipy.data import default_sphere
from dipy.direction.pmf import SHCoeffPmfGen

from pipeline.reconstruction import fodf
from pipeline.tracking import cone

PMF_THRESHOLD = 0.1
MAX_ANGLE_DEG = 45.0


@pytest.fixture(scope="module")
def sh_field():
    """Random order-8 ODF coefficients on a 4×4×4 grid: lobes in every direction,
    negative values included (as CSD gives between its lobes)."""
    rng = np.random.default_rng(11)
    sh = rng.normal(scale=0.4, size=(4, 4, 4, 45))
    sh[..., 0] = 2.0
    return sh


def test_cone_neighbours_are_exactly_the_vertices_within_the_angle_of_either_pole():
    vertices = default_sphere.vertices
    neighbours, counts = cone.cone_neighbours(vertices, MAX_ANGLE_DEG)
    angle = np.rad2deg(np.arccos(np.clip(np.abs(vertices @ vertices.T), 0, 1)))
    for v in range(len(vertices)):
        members = neighbours[v, :counts[v]]
        assert set(members) == set(np.flatnonzero(angle[v] <= MAX_ANGLE_DEG + 1e-9))
        assert v in members
        assert np.all(neighbours[v, counts[v]:] == -1)
    # the 45° cone (both poles) is about 30 % of the 362-direction sphere
    assert 0.25 < counts.mean() / len(vertices) < 0.33


def _dipy_cone_pmf(pmf, vertex, neighbours, counts, threshold):
    """DIPY's probabilistic getter: values below threshold × max dropped, then the cone."""
    pmf = pmf.copy()
    pmf[pmf < threshold] = 0.0
    return pmf[neighbours[vertex, :counts[vertex]]]


def test_cone_odf_equals_dipys_thresholded_pmf_at_voxel_centres(sh_field):
    sphere = default_sphere
    basis = cone.odf_basis(sphere, sh_field.shape[-1], fodf.SH_BASIS)
    neighbours, counts = cone.cone_neighbours(sphere.vertices, MAX_ANGLE_DEG)
    blocks = cone.cone_basis(basis, neighbours, counts)
    maxima = cone.odf_maxima(sh_field, basis)
    dipy_pmf = SHCoeffPmfGen(sh_field, sphere, fodf.SH_BASIS, legacy=False)
    values = np.empty(neighbours.shape[1], dtype=np.float32)
    for voxel in [(0, 0, 0), (1, 2, 3), (3, 1, 2)]:
        pmf = np.array(dipy_pmf.get_pmf(np.array(voxel, dtype=float)))
        assert maxima[voxel] == pytest.approx(pmf.max(), rel=1e-5)
        threshold = PMF_THRESHOLD * maxima[voxel]
        coefficients = sh_field[voxel].astype(np.float32)
        for vertex in (0, 100, 250, 361):
            n = cone.cone_odf(coefficients, vertex, blocks, counts, threshold, values)
            expected = _dipy_cone_pmf(pmf, vertex, neighbours, counts,
                                      PMF_THRESHOLD * pmf.max())
            assert n == counts[vertex]
            np.testing.assert_allclose(values[:n], expected, rtol=1e-4, atol=1e-4)
            assert np.count_nonzero(values[:n]) == np.count_nonzero(expected)


def test_interpolated_maximum_bounds_dipys_between_voxels(sh_field):
    """Off the voxel centres our threshold comes from the interpolated maxima: never
    below DIPY's (the maximum of the interpolated ODF), so no direction DIPY would
    drop is followed."""
    basis = cone.odf_basis(default_sphere, sh_field.shape[-1], fodf.SH_BASIS)
    maxima = cone.odf_maxima(sh_field, basis)
    dipy_pmf = SHCoeffPmfGen(sh_field, default_sphere, fodf.SH_BASIS, legacy=False)
    rng = np.random.default_rng(3)
    flat_index = np.empty(8, dtype=np.int64)
    weight = np.empty(8)
    shape = np.array(sh_field.shape[:3], dtype=np.int64)
    gaps = []
    for point in rng.uniform(0, 3, size=(50, 3)):
        assert cone.trilinear_corners(point, shape, flat_index, weight)
        ours = cone.interpolate_scalar(maxima.reshape(-1), flat_index, weight)
        theirs = np.array(dipy_pmf.get_pmf(point)).max()
        assert ours >= theirs * (1 - 1e-5)
        gaps.append(ours / theirs - 1)
    assert np.median(gaps) > 0  # the bound is not trivially an equality here


def test_trilinear_corners_follow_dipys_grid_limits():
    shape = np.array([4, 5, 6], dtype=np.int64)
    flat_index = np.empty(8, dtype=np.int64)
    weight = np.empty(8)
    assert cone.trilinear_corners(np.array([-0.5, 0.0, 5.49]), shape, flat_index,
                                  weight)
    assert weight.sum() == pytest.approx(1.0)
    assert not cone.trilinear_corners(np.array([-0.51, 0.0, 0.0]), shape, flat_index,
                                      weight)
    assert not cone.trilinear_corners(np.array([0.0, 4.5, 0.0]), shape, flat_index,
                                      weight)
    # at a voxel centre all the weight is on that voxel
    assert cone.trilinear_corners(np.array([1.0, 2.0, 3.0]), shape, flat_index, weight)
    assert weight[np.flatnonzero(flat_index == (1 * 5 + 2) * 6 + 3)].sum() == pytest.approx(1.0)


def test_the_same_seed_gives_the_same_streamlines_and_another_seed_others(sh_field):
    """Numba's random stream is seeded per call: a call depends only on its arguments."""
    basis = cone.odf_basis(default_sphere, sh_field.shape[-1], fodf.SH_BASIS)
    neighbours, counts = cone.cone_neighbours(default_sphere.vertices, MAX_ANGLE_DEG)
    sh = np.ascontiguousarray(sh_field, dtype=np.float32)
    affine = np.array([[-2.0, 0, 0, 6], [0, 2, 0, -3], [0, 0, 2, 1], [0, 0, 0, 1]])  # LAS
    seeds_voxels = np.random.default_rng(0).uniform(0.5, 2.5, size=(40, 3))
    arguments = (
        seeds_voxels @ affine[:3, :3].T + affine[:3, 3], affine, sh.reshape(-1, 45),
        cone.odf_maxima(sh, basis).reshape(-1), np.full(64, 0.5),
        np.array([4, 4, 4], dtype=np.int64), 0.2, basis,
        cone.cone_basis(basis, neighbours, counts),
        np.ascontiguousarray(default_sphere.vertices), neighbours, counts, PMF_THRESHOLD,
        np.full(3, 0.25), 200, 2, False)
    first = cone.track_seeds(*arguments, 5)
    again = cone.track_seeds(*arguments, 5)
    other = cone.track_seeds(*arguments, 6)
    # deterministic: the random stream plays no part
    deterministic = [cone.track_seeds(*arguments[:-1], True, seed) for seed in (5, 6)]
    np.testing.assert_array_equal(deterministic[0][0], deterministic[1][0])
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[1].sum() == len(first[0]) > 0
    assert not (len(first[0]) == len(other[0]) and np.array_equal(first[0], other[0]))
    # every step is 0.25 voxel (0.5 mm) long, across the seed where the two halves meet too
    steps = np.linalg.norm(np.diff(first[0][:first[1][0]], axis=0), axis=1)
    np.testing.assert_allclose(steps, 0.5, rtol=1e-5)
    # the first streamline passes through its seed, in world coordinates
    assert np.min(np.linalg.norm(first[0][:first[1][0]] - arguments[0][0], axis=1)) < 1e-5
