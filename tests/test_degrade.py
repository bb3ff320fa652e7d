"""Degraded copies (pipeline/sims/degrade.py) on small synthetic images: no pipeline runs."""

import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.io.dwi import count_unique_directions, fsl_bvecs_to_voxel_frame
from pipeline.sims import degrade


def _oblique_affine(zooms, *, flip_x=False):
    """A rotated (oblique) voxel → world affine with the given voxel sizes."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    linear = rot_z @ rot_x @ np.diag(zooms)
    if flip_x:
        linear[:, 0] *= -1
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-40.0, 25.0, -18.0]
    return affine


def _linear_field(affine, shape, n_volumes=2):
    """4D data whose value is an affine function of world position (different per volume)."""
    ijk = np.indices(shape).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    coefficients = np.array([[0.7, -0.4, 1.1], [-0.2, 0.9, 0.5]])[:n_volumes]
    values = 500.0 + world @ coefficients.T
    return values.reshape(*shape, n_volumes).astype(np.float32), coefficients


def _interior_values_match(data, affine, old_affine, old_shape, coefficients, margin=3):
    """The resampled values equal the world field wherever the old grid was interior."""
    ijk = np.indices(data.shape[:3]).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    old_ijk = nib.affines.apply_affine(np.linalg.inv(old_affine), world)
    inside = np.all((old_ijk >= margin) & (old_ijk <= np.array(old_shape) - 1 - margin), axis=1)
    assert inside.sum() > 50
    expected = 500.0 + world[inside] @ coefficients.T
    np.testing.assert_allclose(data.reshape(-1, data.shape[-1])[inside], expected, atol=0.05)


@pytest.mark.parametrize("flip_x", [False, True])
def test_reslice_isotropic_shape_voxels_and_world_positions(flip_x):
    affine = _oblique_affine([1.5, 1.5, 2.0], flip_x=flip_x)
    shape = (30, 28, 18)
    data, coefficients = _linear_field(affine, shape)
    before = data.copy()
    out, new_affine = degrade.reslice_isotropic(data, affine, 3.0)
    np.testing.assert_array_equal(data, before)  # input untouched
    assert out.shape == (15, 14, 12, 2)
    np.testing.assert_allclose(degrade.voxel_sizes(new_affine), [3.0, 3.0, 3.0])
    # Axis directions and determinant sign kept: FSL b-vectors stay valid.
    np.testing.assert_allclose(new_affine[:3, :3] / 3.0, affine[:3, :3] / [1.5, 1.5, 2.0])
    assert np.sign(np.linalg.det(new_affine)) == np.sign(np.linalg.det(affine))
    # Voxel (0, 0, 0) keeps its world position, and so does every point.
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3])
    _interior_values_match(out, new_affine, affine, shape, coefficients)


def test_reslice_point_keeps_world_position():
    """A bright blob is found at the same world position after resampling (within a voxel)."""
    affine = _oblique_affine([1.0, 1.0, 1.0])
    shape = (40, 40, 40)
    ijk = np.indices(shape).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    centre = nib.affines.apply_affine(affine, [21.3, 17.6, 19.2])
    blob = np.exp(-np.sum((world - centre) ** 2, axis=1) / (2 * 3.0 ** 2)).reshape(shape)
    for out, new_affine in (degrade.reslice_isotropic(blob, affine, 3.0),
                            degrade.thick_slices(blob, affine, 5.0, axis=2)):
        grid = np.indices(out.shape).reshape(3, -1).T
        weights = out.ravel() ** 4
        found = nib.affines.apply_affine(new_affine, weights @ grid / weights.sum())
        assert np.linalg.norm(found - centre) < 1.0


def test_thick_slices_through_plane_axis_only():
    affine = _oblique_affine([1.8, 1.8, 2.5])
    shape = (24, 26, 30)
    data, coefficients = _linear_field(affine, shape)
    out, new_affine = degrade.thick_slices(data, affine, 5.0)
    assert out.shape == (24, 26, 15, 2)
    np.testing.assert_allclose(degrade.voxel_sizes(new_affine), [1.8, 1.8, 5.0])
    np.testing.assert_allclose(new_affine[:, :2], affine[:, :2])  # in-plane columns unchanged
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3])
    _interior_values_match(out, new_affine, affine, shape, coefficients)


def test_thick_slices_default_axis_is_closest_to_world_z():
    """Sagittal storage: the voxel axis along world z is the second one."""
    affine = np.array([[0, 0, 2.0, -60], [-2.0, 0, 0, 90], [0, 2.0, 0, -70], [0, 0, 0, 1]])
    out, new_affine = degrade.thick_slices(np.ones((20, 30, 25)), affine, 5.0)
    assert out.shape == (20, 12, 25)
    np.testing.assert_allclose(degrade.voxel_sizes(new_affine), [2.0, 5.0, 2.0])


def _sphere_directions(n, seed=3):
    """``n`` unit vectors, roughly uniform on the sphere."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _min_line_angle_deg(units):
    cos = np.abs(units @ units.T)
    np.fill_diagonal(cos, 0.0)
    return float(np.degrees(np.arccos(cos.max())))


def test_direction_subset_twelve_distinct_well_spread():
    dirs = _sphere_directions(40)
    # Two b0s, the 40 directions at b=1000 (one repeated, one antipodal), and a b=2000 shell.
    bvecs = np.vstack([np.zeros((2, 3)), dirs, dirs[:1], -dirs[1:2], _sphere_directions(10, 7)])
    bvals = np.r_[0, 5, np.full(42, 1000.0), np.full(10, 2000.0)]
    keep = degrade.direction_subset(bvals, bvecs, 12)
    again = degrade.direction_subset(bvals, bvecs, 12)
    np.testing.assert_array_equal(keep, again)  # deterministic
    assert list(keep[:2]) == [0, 1]  # the b0s (b=5 counts as b0)
    weighted = keep[2:]
    assert len(weighted) == 12 and np.all(bvals[weighted] == 1000.0)
    assert count_unique_directions(bvecs[keep], bvals[keep], 50.0) == 12
    chosen = _min_line_angle_deg(bvecs[weighted])
    rng = np.random.default_rng(0)
    random_subsets = [_min_line_angle_deg(dirs[rng.choice(40, 12, replace=False)])
                      for _ in range(300)]
    assert chosen > max(random_subsets)
    assert chosen > 30.0  # the best 12 lines in 3D are 41.8° apart at most


def test_direction_subset_too_few_directions():
    bvecs = np.vstack([np.zeros(3), _sphere_directions(8), _sphere_directions(8)])
    with pytest.raises(ValueError, match="fewer than 12"):
        degrade.direction_subset(np.r_[0, np.full(16, 1000.0)], bvecs, 12)


def test_rician_noise_doubles_sigma():
    rng = np.random.default_rng(1)
    sigma0, signal = 20.0, 1000.0
    clean = np.full((40, 40, 40), signal, dtype=np.float32)
    noisy = np.hypot(clean + sigma0 * rng.standard_normal(clean.shape),
                     sigma0 * rng.standard_normal(clean.shape)).astype(np.float32)
    before = noisy.copy()
    worse = degrade.add_rician_noise(noisy, sigma0 * np.sqrt(3.0), seed=5)
    np.testing.assert_array_equal(noisy, before)
    assert np.std(worse) == pytest.approx(2 * np.std(noisy), rel=0.10)
    assert np.std(worse) == pytest.approx(2 * sigma0, rel=0.10)
    np.testing.assert_array_equal(worse, degrade.add_rician_noise(noisy, sigma0 * np.sqrt(3.0),
                                                                  seed=5))
    # Background (no signal) becomes Rayleigh: mean σ·sqrt(π/2), never negative.
    background = degrade.add_rician_noise(np.zeros(100000), 10.0, seed=2)
    assert background.min() >= 0
    assert background.mean() == pytest.approx(10.0 * np.sqrt(np.pi / 2), rel=0.02)


@pytest.mark.parametrize("flip_x", [False, True])
def test_flip_storage_x_same_world_image(flip_x):
    affine = _oblique_affine([2.0, 2.0, 3.0], flip_x=flip_x)
    data = np.random.default_rng(4).random((9, 7, 5, 3)).astype(np.float32)
    flipped, new_affine = degrade.flip_storage_x(data, affine)
    assert flipped.shape == data.shape
    assert np.sign(np.linalg.det(new_affine)) == -np.sign(np.linalg.det(affine))
    # Every voxel of the flipped image has the value of the original voxel at its world point.
    ijk = np.indices(data.shape[:3]).reshape(3, -1).T
    world = nib.affines.apply_affine(new_affine, ijk)
    source = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), world)).astype(int)
    np.testing.assert_array_equal(flipped[tuple(ijk.T)], data[tuple(source.T)])
    # The FSL b-vectors, unchanged, give the same world gradient directions.
    bvecs = _sphere_directions(6)
    world_before = fsl_bvecs_to_voxel_frame(bvecs, affine) @ affine[:3, :3].T
    world_after = fsl_bvecs_to_voxel_frame(bvecs, new_affine) @ new_affine[:3, :3].T
    np.testing.assert_allclose(world_after, world_before)


def _write_run(folder, data, affine, bvals, bvecs, dtype=np.int16):
    folder.mkdir(parents=True)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(folder / "sub-x_dir-AP_dwi.nii.gz"))
    np.savetxt(folder / "sub-x_dir-AP_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / "sub-x_dir-AP_dwi.bvec", bvecs.T, fmt="%.6f")
    (folder / "sub-x_dir-AP_dwi.json").write_text(json.dumps({"SliceTiming": [0.0] * 8}))
    return folder / "sub-x_dir-AP_dwi.nii.gz"


@pytest.mark.parametrize("name", degrade.DEGRADATIONS)
def test_degrade_series_writes_a_consistent_bids_run(tmp_path, name):
    affine = _oblique_affine([1.5, 1.5, 2.5])
    bvals = np.r_[0.0, np.full(16, 1000.0)]
    bvecs = np.vstack([np.zeros(3), _sphere_directions(16)])
    rng = np.random.default_rng(6)
    data = (800 + 100 * rng.random((16, 14, 8, 17))).astype(np.float32)
    source = _write_run(tmp_path / "src", data, affine, bvals, bvecs)
    stamp = source.stat().st_mtime_ns
    series = degrade.read_series(source)
    out, info = degrade.degrade_series(series, name, noise_sigma=10.0, seed=1)
    assert out is not None, info
    written = degrade.write_series(out, tmp_path / "copy" / "sub-x" / "dwi", "sub-x_dir-AP",
                                   sidecar=source.with_name("sub-x_dir-AP_dwi.json"),
                                   note={"degradation": name, **info})
    assert source.stat().st_mtime_ns == stamp
    back = degrade.read_series(written)
    np.testing.assert_allclose(back.affine, out.affine, atol=1e-5)
    np.testing.assert_allclose(back.data, out.data, atol=0.05)
    np.testing.assert_allclose(back.header.get_zooms()[:3], degrade.voxel_sizes(out.affine),
                               atol=1e-5)
    assert back.data.shape[-1] == len(back.bvals) == len(back.bvecs_fsl)
    sidecar = json.loads(written.with_name("sub-x_dir-AP_dwi.json").read_text())
    assert sidecar["CstValidation"]["degradation"] == name
    assert ("SliceTiming" in sidecar) == (back.data.shape[2] == 8)
    if name == "12dir":
        assert back.data.shape[-1] == 13 and back.bvals[0] == 0
    if name != "12dir":
        np.testing.assert_allclose(back.bvecs_fsl, bvecs, atol=1e-6)


def test_degrade_series_skips_scans_already_coarse():
    affine = np.diag([3.0, 3.0, 5.2, 1.0])
    bvals = np.r_[0.0, np.full(12, 1500.0)]
    bvecs = np.vstack([np.zeros(3), _sphere_directions(12)])
    series = degrade.Series(np.ones((4, 4, 4, 13), np.float32), affine, bvals, bvecs,
                            nib.Nifti1Header())
    for name in ("3mm", "12dir", "5mm"):
        out, info = degrade.degrade_series(series, name)
        assert out is None and "already" in info["skipped"]
