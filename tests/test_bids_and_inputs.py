"""Tests of BIDS discovery (pipeline/io/bids.py) and DWI loading/validation and
gradient conventions (pipeline/io/dwi.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import EXIT_BAD_INPUT, InputError
from pipeline.io.bids import find_dwi_runs, normalize_subject_label
from pipeline.io.dwi import (
    MIN_DIRECTIONS,
    fsl_bvecs_to_voxel_frame,
    load_dwi,
    voxel_directions_to_world,
)

# --------------------------------------------------------------------------- helpers

#: Seven well separated, non-collinear unit directions (more than MIN_DIRECTIONS).
DIRS7 = np.array([
    [1, 0, 0],
    [0, 1, 0],
    [0, 0, 1],
    [1, 1, 0],
    [1, 0, 1],
    [0, 1, 1],
    [1, -1, 1],
], dtype=float)
DIRS7 /= np.linalg.norm(DIRS7, axis=1, keepdims=True)


def _write_run(stem, *, shape=(12, 12, 10), bvals=None, bvecs=None, data=None,
               zooms=(2.0, 2.0, 2.0), affine=None):
    """Write ``stem``.nii.gz/.bval/.bvec; return the three paths.

    Default: one b0 followed by the seven DIRS7 directions at b=1000 (8 volumes).
    ``bvecs`` are (N, 3) and are written as FSL's three rows.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    if bvals is None:
        bvals = np.array([0.0] + [1000.0] * len(DIRS7))
    if bvecs is None:
        bvecs = np.vstack([[0.0, 0.0, 0.0], DIRS7])
    bvals = np.asarray(bvals, dtype=float)
    bvecs = np.asarray(bvecs, dtype=float)
    if data is None:
        rng = np.random.default_rng(0)
        n_vols = len(bvals)
        data = (rng.uniform(100, 200, size=tuple(shape) + (n_vols,))).astype(np.float32)
    if affine is None:
        affine = np.diag(list(zooms) + [1.0])
    img = nib.Nifti1Image(data, affine)
    if data.ndim >= 3:
        img.header.set_zooms(tuple(zooms) + tuple(img.header.get_zooms()[3:]))
    dwi = stem.with_name(stem.name + ".nii.gz")
    bval = stem.with_name(stem.name + ".bval")
    bvec = stem.with_name(stem.name + ".bvec")
    nib.save(img, dwi)
    np.savetxt(bval, bvals[None, :], fmt="%.6g")
    np.savetxt(bvec, bvecs.T, fmt="%.8f")
    return dwi, bval, bvec


def _bids_run(root, label, *, ses=None, extra="", **kw):
    folder = root / f"sub-{label}"
    name = f"sub-{label}"
    if ses is not None:
        folder = folder / f"ses-{ses}"
        name += f"_ses-{ses}"
    name += extra + "_dwi"
    return _write_run(folder / "dwi" / name, **kw)


# --------------------------------------------------------------------------- subject labels

@pytest.mark.parametrize("given, expected", [
    ("sub-01", "01"), ("01", "01"), ("sub-Control7", "Control7"), ("ABC", "ABC"),
])
def test_normalize_subject_label_accepts(given, expected):
    assert normalize_subject_label(given) == expected


@pytest.mark.parametrize("bad", ["sub-0_1", "../x", "", "sub-", "sub-01/dwi", "0 1", "sub-ab-c"])
def test_normalize_subject_label_rejects(bad):
    with pytest.raises(InputError) as info:
        normalize_subject_label(bad)
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert repr(bad)[1:-1] in str(info.value) or bad in str(info.value)


def test_normalize_subject_label_rejects_trailing_newline():
    with pytest.raises(InputError):
        normalize_subject_label("sub-01\n")


# --------------------------------------------------------------------------- find_dwi_runs

def test_find_single_run(tmp_path):
    dwi, bval, bvec = _bids_run(tmp_path, "01")
    runs = find_dwi_runs(tmp_path, "sub-01")
    assert len(runs) == 1
    run = runs[0]
    assert (run.dwi, run.bval, run.bvec) == (dwi, bval, bvec)
    assert run.sidecar is None
    assert run.entities == {"sub": "01"}
    assert run.stem == "sub-01"
    assert run.subject == "01"
    assert run.derivatives_dir(tmp_path / "out") == tmp_path / "out" / "sub-01" / "dwi"
    # the bare label finds the same run
    assert find_dwi_runs(tmp_path, "01") == runs


def test_find_two_phase_encoding_runs(tmp_path):
    ap = _bids_run(tmp_path, "X", extra="_dir-AP")
    pa = _bids_run(tmp_path, "X", extra="_dir-PA")
    (ap[0].parent / "sub-X_dir-AP_dwi.json").write_text('{"PhaseEncodingDirection": "j-"}')
    _bids_run(tmp_path, "Y")  # another subject must not leak in
    runs = find_dwi_runs(tmp_path, "sub-X")
    assert [r.dwi for r in runs] == [ap[0], pa[0]]
    assert [r.bvec for r in runs] == [ap[2], pa[2]]
    assert runs[0].entities == {"sub": "X", "dir": "AP"}
    assert runs[1].entities == {"sub": "X", "dir": "PA"}
    assert runs[0].stem == "sub-X_dir-AP"
    assert runs[1].stem == "sub-X_dir-PA"
    assert runs[0].metadata() == {"PhaseEncodingDirection": "j-"}
    assert runs[1].sidecar is None and runs[1].metadata() == {}


def test_find_run_in_session(tmp_path):
    dwi, _, _ = _bids_run(tmp_path, "02", ses="pre", extra="_acq-b1000_run-1")
    runs = find_dwi_runs(tmp_path, "02")
    assert len(runs) == 1
    assert runs[0].dwi == dwi
    assert runs[0].entities == {"sub": "02", "ses": "pre", "acq": "b1000", "run": "1"}
    assert runs[0].stem == "sub-02_ses-pre_acq-b1000_run-1"
    assert runs[0].derivatives_dir(tmp_path / "d") == tmp_path / "d" / "sub-02" / "ses-pre" / "dwi"


def test_stem_uses_bids_entity_order(tmp_path):
    # a (non-conformant) file name with entities out of order still gives an ordered stem
    _write_run(tmp_path / "sub-03" / "dwi" / "sub-03_run-2_dir-AP_dwi")
    (run,) = find_dwi_runs(tmp_path, "03")
    assert run.stem == "sub-03_dir-AP_run-2"


def test_missing_bvec_names_the_file(tmp_path):
    _, _, bvec = _bids_run(tmp_path, "01", extra="_dir-AP")
    bvec.unlink()
    with pytest.raises(InputError) as info:
        find_dwi_runs(tmp_path, "sub-01")
    assert info.value.path == bvec
    assert str(bvec) in str(info.value)


def test_missing_bval_names_the_file(tmp_path):
    _, bval, _ = _bids_run(tmp_path, "01")
    bval.unlink()
    with pytest.raises(InputError) as info:
        find_dwi_runs(tmp_path, "01")
    assert info.value.path == bval


def test_unknown_subject_lists_known_subjects(tmp_path):
    _bids_run(tmp_path, "01")
    _bids_run(tmp_path, "02")
    with pytest.raises(InputError) as info:
        find_dwi_runs(tmp_path, "sub-99")
    err = info.value
    assert err.path == tmp_path / "sub-99"
    assert "sub-99" in err.message
    assert "sub-01" in err.fix and "sub-02" in err.fix


def test_missing_dataset_and_no_dwi(tmp_path):
    with pytest.raises(InputError) as info:
        find_dwi_runs(tmp_path / "nope", "01")
    assert info.value.path == tmp_path / "nope"
    (tmp_path / "sub-05" / "anat").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        find_dwi_runs(tmp_path, "05")
    assert info.value.path == tmp_path / "sub-05"


# --------------------------------------------------------------------------- load_dwi

def test_load_valid_counts_unique_directions(tmp_path):
    # 2 b0 + 7 directions + the same 7 directions antipodal + 3 near-repeats (2 degrees off)
    near = DIRS7[:3] + np.array([[0, 0.035, 0], [0.035, 0, 0], [0, 0.035, 0]])
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    bvecs = np.vstack([np.zeros((2, 3)), DIRS7, -DIRS7, near])
    bvals = np.array([0.0, 0.0] + [1000.0] * (len(bvecs) - 2))
    dwi, bval, bvec = _write_run(tmp_path / "ok_dwi", bvals=bvals, bvecs=bvecs)
    scan = load_dwi(dwi, bval, bvec)
    assert scan.n_unique_directions == 7
    assert scan.b0_mask.tolist() == [True, True] + [False] * (len(bvecs) - 2)
    np.testing.assert_allclose(scan.bvals, bvals)
    np.testing.assert_allclose(scan.bvecs_fsl, bvecs, atol=1e-7)
    gtab = scan.gradient_table()
    assert gtab.b0s_mask.tolist() == scan.b0_mask.tolist()


def test_load_accepts_b0_stored_as_small_bvalue(tmp_path):
    bvals = np.array([1.25] + [1000.0] * len(DIRS7))
    dwi, bval, bvec = _write_run(tmp_path / "b_dwi", bvals=bvals)
    scan = load_dwi(dwi, bval, bvec)
    assert scan.b0_mask.tolist() == [True] + [False] * len(DIRS7)
    assert scan.n_unique_directions == 7
    # ... but not with a threshold below 1.25
    with pytest.raises(InputError) as info:
        load_dwi(dwi, bval, bvec, b0_threshold=1.0)
    assert info.value.path == bval


def _bad_case(tmp_path, case):
    """Build one invalid run; return (dwi, bval, bvec, which path must be blamed)."""
    stem = tmp_path / f"{case}_dwi"
    n = 1 + len(DIRS7)
    if case == "3d":
        d = _write_run(stem, data=np.ones((12, 12, 10), np.float32))
        return d + (0,)
    if case == "count_mismatch":
        bvals = np.array([0.0] + [1000.0] * len(DIRS7) + [1000.0])
        bvecs = np.vstack([[0, 0, 0], DIRS7, DIRS7[:1]])
        data = np.ones((12, 12, 10, n), np.float32)
        return _write_run(stem, bvals=bvals, bvecs=bvecs, data=data) + (1,)
    if case == "no_b0":
        return _write_run(stem, bvals=[1000.0] * n, bvecs=np.vstack([DIRS7[:1], DIRS7])) + (1,)
    if case == "all_b0":
        return _write_run(stem, bvals=[0.0] * n, bvecs=np.zeros((n, 3))) + (1,)
    if case == "negative_b":
        bvals = np.array([0.0] + [1000.0] * (n - 2) + [-1000.0])
        return _write_run(stem, bvals=bvals) + (1,)
    if case == "zero_bvec":
        bvecs = np.vstack([[0, 0, 0], DIRS7])
        bvecs[4] = 0.0
        return _write_run(stem, bvecs=bvecs) + (2,)
    if case == "few_directions":
        # 10 volumes: one b0 and 9 diffusion-weighted repeating 3 directions (with sign flips)
        three = DIRS7[:3]
        bvecs = np.vstack([[0, 0, 0], three, -three, three])
        bvals = np.array([0.0] + [1000.0] * 9)
        return _write_run(stem, bvals=bvals, bvecs=bvecs) + (2,)
    if case == "nan_data":
        data = np.full((12, 12, 10, n), 100.0, np.float32)
        data[3, 4, 5, 2] = np.nan
        return _write_run(stem, data=data) + (0,)
    if case == "zero_data":
        return _write_run(stem, data=np.zeros((12, 12, 10, n), np.float32)) + (0,)
    if case == "huge_voxels":
        return _write_run(stem, zooms=(50.0, 50.0, 50.0)) + (0,)
    if case == "tiny_grid":
        return _write_run(stem, shape=(12, 12, 4)) + (0,)
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "3d", "count_mismatch", "no_b0", "all_b0", "negative_b", "zero_bvec", "few_directions",
    "nan_data", "zero_data", "huge_voxels", "tiny_grid",
])
def test_load_dwi_rejects(tmp_path, case):
    *paths, blamed = _bad_case(tmp_path, case)
    with pytest.raises(InputError) as info:
        load_dwi(*paths)
    assert info.value.path == paths[blamed]
    assert info.value.fix
    assert str(paths[blamed]) in str(info.value)


def test_few_directions_message_counts_them(tmp_path):
    *paths, _ = _bad_case(tmp_path, "few_directions")
    with pytest.raises(InputError) as info:
        load_dwi(*paths)
    assert "Only 3 distinct" in info.value.message
    assert MIN_DIRECTIONS == 6


def test_bad_data_passes_when_data_check_is_off(tmp_path):
    # check_data=False skips only the voxel-value checks
    *paths, _ = _bad_case(tmp_path, "zero_data")
    scan = load_dwi(*paths, check_data=False)
    assert scan.n_unique_directions == 7


# --------------------------------------------------------------------------- gradient conventions

def test_fsl_bvecs_flip_x_iff_positive_determinant():
    vecs = np.array([[0.6, 0.8, 0.0], [-0.3, 0.1, 0.9]])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    np.testing.assert_array_equal(fsl_bvecs_to_voxel_frame(vecs, ras),
                                  vecs * np.array([-1, 1, 1]))
    np.testing.assert_array_equal(fsl_bvecs_to_voxel_frame(vecs, las), vecs)
    # the caller's array is not modified
    assert vecs[0, 0] == 0.6
    # a y-flip also has a negative determinant: no x flip
    lps_flip_y = np.diag([2.0, -2.0, 2.0, 1.0])
    np.testing.assert_array_equal(fsl_bvecs_to_voxel_frame(vecs, lps_flip_y), vecs)
    # a permuted (det > 0 after two sign changes) affine flips
    perm = np.array([[0, -2.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    assert np.linalg.det(perm[:3, :3]) < 0
    np.testing.assert_array_equal(fsl_bvecs_to_voxel_frame(vecs, perm), vecs)


def test_voxel_directions_to_world_las():
    las = np.diag([-2.0, 2.5, 3.0, 1.0])
    las[:3, 3] = [50, -20, 10]
    out = voxel_directions_to_world(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), las)
    np.testing.assert_allclose(out, [[-1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # anisotropic voxels must not bend directions; zero vectors stay zero
    diag = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = voxel_directions_to_world(diag, las)
    np.testing.assert_allclose(out, [[-np.sqrt(0.5), np.sqrt(0.5), 0], [0, 0, 0]])


def _fibonacci_hemisphere(n):
    i = np.arange(n) + 0.5
    z = i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _simulate(fibre_world, affine, shape, gdirs_world, bvals, lam_perp_of_world_x):
    """Noise-free single-tensor signal of a fibre along ``fibre_world``; the
    perpendicular diffusivity varies with world x so FA varies in space."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    lam1 = 1.7e-3
    lam2 = lam_perp_of_world_x(world[..., 0])
    e = fibre_world / np.linalg.norm(fibre_world)
    proj2 = (gdirs_world @ e) ** 2  # (N,)
    # g^T D g = lam2 + (lam1 - lam2) (g.e)^2
    adc = lam2[..., None] + (lam1 - lam2)[..., None] * proj2
    return 1000.0 * np.exp(-bvals * adc)


@pytest.mark.parametrize("fibre", [(1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.0, -1.0)],
                         ids=["x", "xy-oblique", "xz-oblique"])
def test_tensor_fit_is_independent_of_storage_order(tmp_path, fibre):
    """The same anatomy stored RAS and with x reversed gives the same world v1 and FA.

    The oblique fibres would turn by 90 degrees if the x flip of the b-vectors
    were applied wrongly (a fibre along x alone cannot reveal an x sign error).
    """
    from dipy.reconst.dti import TensorModel

    fibre = np.asarray(fibre) / np.linalg.norm(fibre)
    shape = (10, 10, 8)
    g_world = _fibonacci_hemisphere(30)
    bvals = np.array([0.0, 0.0] + [1000.0] * 30)
    g_world_all = np.vstack([np.zeros((2, 3)), g_world])
    lam_perp = lambda x: 0.2e-3 + 0.03e-3 * x / 2.0  # noqa: E731  (world x in mm)

    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[0, 3] = 2.0 * (shape[0] - 1)  # voxel i' = 9 - i is at the same world x
    results = {}
    for name, affine in (("ras", ras), ("las", las)):
        data = _simulate(fibre, affine, shape, g_world_all, bvals, lam_perp)
        # world → voxel-frame gradient directions, then FSL convention
        lin = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        g_vox = g_world_all @ lin  # inverse of an orthonormal matrix is its transpose
        g_fsl = g_vox.copy()
        if np.linalg.det(affine[:3, :3]) > 0:
            g_fsl[:, 0] *= -1
        dwi, bval, bvec = _write_run(tmp_path / f"{name}_dwi", bvals=bvals, bvecs=g_fsl,
                                     data=data.astype(np.float64), affine=affine)
        scan = load_dwi(dwi, bval, bvec)
        assert scan.n_unique_directions == 30
        fit = TensorModel(scan.gradient_table()).fit(np.asarray(scan.img.dataobj))
        v1_world = voxel_directions_to_world(fit.evecs[..., :, 0], scan.affine)
        results[name] = (fit.fa, v1_world)

    fa_ras, v1_ras = results["ras"]
    fa_las, v1_las = results["las"]
    assert np.all(np.abs(v1_ras @ fibre) > 0.99)
    assert np.all(np.abs(v1_las @ fibre) > 0.99)
    assert np.all(np.abs(v1_ras @ np.array([1.0, 0, 0])) > 0.99) == (fibre[0] == 1.0)
    # same voxel in world ⇔ index flipped along x
    np.testing.assert_allclose(fa_las[::-1], fa_ras, atol=1e-6, rtol=0)
    # FA really varies in space, so the comparison above is not trivial
    assert np.ptp(fa_ras) > 0.05
    # expected FA from the simulated eigenvalues at one voxel
    l1, l2 = 1.7e-3, lam_perp(2.0 * 3)
    md = (l1 + 2 * l2) / 3
    fa_true = np.sqrt(1.5 * ((l1 - md) ** 2 + 2 * (l2 - md) ** 2) / (l1 ** 2 + 2 * l2 ** 2))
    assert fa_ras[3, 4, 2] == pytest.approx(fa_true, abs=1e-4)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    """Atomic writes go through a private temporary file; the output must not stay private."""
    import os
    import stat

    from pipeline.io.outputs import write_json

    previous = os.umask(umask)
    try:
        path = write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert not list(tmp_path.glob(".*tmp*"))
