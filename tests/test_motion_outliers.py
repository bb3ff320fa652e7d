"""Motion/eddy correction and outlier volumes on real scans (skipped when absent).

Known motion and dropout are simulated on real scans. sub-philips01 already has
head motion of its own (a drift of up to ~4.6 mm), so the truth for a moved
volume is the simulated transform composed with the scan's own motion, as
estimated on the unmoved scan.
"""

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from dipy.align.imaffine import AffineMap
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from dipy.segment.mask import median_otsu
from scipy.linalg import polar
from scipy.spatial.transform import Rotation

from pipeline.io.dwi import fsl_bvecs_to_voxel_frame, load_dwi, voxel_directions_to_world
from pipeline.preprocessing.motion import correct_motion, motion_parameters, rotate_bvecs
from pipeline.preprocessing.outliers import detect_outlier_volumes

from .conftest import SHARED_BIDS

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

B0_THRESHOLD = 50.0
#: Simulated motion of sub-philips01: volume -> (translation mm, rotation degrees about
#: world x, y, z through the brain centre); the other volumes stay where they were.
SIMULATED_MOTION = {
    3: ((2.5, -1.5, 1.0), (2.0, -1.0, 2.5)),
    9: ((-2.0, 2.5, -1.0), (-2.5, 1.5, 1.0)),
    15: ((1.0, 1.0, -2.5), (1.0, 3.0, -2.0)),
    21: ((-1.0, -2.0, 2.0), (-3.0, -2.0, 1.5)),
    27: ((3.0, 0.5, 0.5), (0.5, 0.5, -3.0)),
    32: ((-0.5, -3.0, -1.5), (1.5, -2.5, -1.0)),
}
MAX_ERROR_MM, MAX_ERROR_DEG = 0.5, 0.5
#: The one dropout in the unmodified scans: sub-siemens02, volume 8, sagittal slice 15
#: keeps 7% of its signal (checked by eye: the slice is black in that volume only).
KNOWN_DROPOUT = {"sub-siemens02": [[8, 15]]}
DROPOUT_VOLUME = 10
RUNS = sorted(p.name[:-len("_dwi.nii.gz")] for p in SHARED_BIDS.glob("sub-*/dwi/*_dwi.nii.gz"))


def _load(stem):
    """(scan, float32 data, head mask from DIPY's median_otsu of the mean b0) of a run."""
    base = SHARED_BIDS / stem.split("_")[0] / "dwi" / f"{stem}_dwi"
    scan = load_dwi(f"{base}.nii.gz", f"{base}.bval", f"{base}.bvec",
                    b0_threshold=B0_THRESHOLD, check_data=False)
    data = np.asarray(scan.img.dataobj, dtype=np.float32)
    mask = median_otsu(data[..., scan.b0_mask].mean(axis=-1), median_radius=2, numpass=1)[1]
    return scan, data, mask


def _rigid_about(centre, translation_mm, rotation_deg):
    """World transform rotating about ``centre`` (extrinsic x, y, z angles), then translating."""
    rotation = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = centre - rotation @ centre + np.asarray(translation_mm)
    return transform


def _move(volume, transform, affine):
    """The volume with its head moved by the world ``transform`` (linear interpolation)."""
    shape = volume.shape
    return AffineMap(np.linalg.inv(transform), domain_grid_shape=shape, domain_grid2world=affine,
                     codomain_grid_shape=shape, codomain_grid2world=affine
                     ).transform(volume).astype(np.float32)


def _rotation_deg(matrix):
    """Angle (degrees) of the rotation part of a 3x3 or 4x4 matrix."""
    return float(np.rad2deg(Rotation.from_matrix(polar(matrix[:3, :3])[0]).magnitude()))


def _world_bvecs(bvecs_fsl, affine):
    return voxel_directions_to_world(fsl_bvecs_to_voxel_frame(bvecs_fsl, affine), affine)


def _fa(data, bvals, bvecs_fsl, affine, mask):
    gtab = gradient_table(bvals, bvecs=fsl_bvecs_to_voxel_frame(bvecs_fsl, affine),
                          b0_threshold=B0_THRESHOLD)
    return np.nan_to_num(TensorModel(gtab).fit(data, mask=mask).fa)


@pytest.fixture(scope="module")
def philips():
    scan, data, mask = _load("sub-philips01")
    return SimpleNamespace(data=data, bvals=scan.bvals, bvecs=scan.bvecs_fsl,
                           affine=scan.affine, mask=mask)


@pytest.fixture(scope="module")
def motion_run(philips):
    """sub-philips01 corrected as it is and with SIMULATED_MOTION (affine model, 2 workers)."""
    centre = nib.affines.apply_affine(philips.affine, np.argwhere(philips.mask).mean(axis=0))
    truths = {v: _rigid_about(centre, t, r) for v, (t, r) in SIMULATED_MOTION.items()}
    moved = philips.data.copy()
    for volume, transform in truths.items():
        moved[..., volume] = _move(philips.data[..., volume], transform, philips.affine)

    def run(data):
        return correct_motion(data, philips.bvals, philips.bvecs, philips.affine, philips.mask,
                              b0_threshold=B0_THRESHOLD, model="affine", n_jobs=2)

    unmoved = run(philips.data)
    # The truth for a moved volume: its own motion, then the simulated one.
    truths = {v: transform @ unmoved.volume_affines[v] for v, transform in truths.items()}
    return SimpleNamespace(centre=centre, moved=moved, truths=truths, unmoved=unmoved,
                           corrected=run(moved))


def test_simulated_motion_is_recovered(motion_run):
    corrected, centre = motion_run.corrected, motion_run.centre
    for volume, truth in motion_run.truths.items():
        error = corrected.volume_affines[volume] @ np.linalg.inv(truth)
        shift_at_centre = np.linalg.norm(error[:3, :3] @ centre + error[:3, 3] - centre)
        assert shift_at_centre < MAX_ERROR_MM, (volume, shift_at_centre)
        assert _rotation_deg(error) < MAX_ERROR_DEG, (volume, _rotation_deg(error))
        difference = corrected.parameters[volume] - motion_parameters(truth)
        assert np.all(np.abs(difference[:3]) < MAX_ERROR_MM), (volume, difference)
        assert np.all(np.abs(difference[3:]) < MAX_ERROR_DEG), (volume, difference)
    # The reference (the only b0) is the same, so untouched volumes get the same answer.
    untouched = [v for v in range(len(corrected.volume_affines)) if v not in motion_run.truths]
    assert np.array_equal(corrected.volume_affines[untouched],
                          motion_run.unmoved.volume_affines[untouched])
    assert np.array_equal(corrected.volume_affines[0], np.eye(4))
    assert corrected.data.dtype == np.float32
    assert corrected.framewise_displacement[0] == 0.0


def test_bvecs_follow_the_head_rotation(motion_run, philips):
    estimated = _world_bvecs(motion_run.corrected.bvecs_fsl, philips.affine)
    measured = _world_bvecs(philips.bvecs, philips.affine)
    for volume, truth in motion_run.truths.items():
        # The head turned by R: the gradient ran along R.T @ g in the reference head.
        expected = polar(truth[:3, :3])[0].T @ measured[volume]
        angle = np.rad2deg(np.arccos(np.clip(expected @ estimated[volume], -1.0, 1.0)))
        assert angle < MAX_ERROR_DEG, (volume, angle)
    b0 = philips.bvals <= B0_THRESHOLD
    assert np.array_equal(motion_run.corrected.bvecs_fsl[b0], philips.bvecs[b0])


@pytest.mark.parametrize("voxel_x", [-1.75, 1.75])
def test_bvec_rotation_convention(voxel_x):
    """Head turned 90° about world z (its right side to the front), both affine handednesses.

    A gradient along world +y then probes the reference head along +x: in the
    FSL convention that is -x for both storage orders (voxel x along world -x
    with no flip, or along +x with FSL's flip).
    """
    affine = np.diag([voxel_x, 1.75, 2.5, 1.0])
    turn = _rigid_about(np.zeros(3), (0, 0, 0), (0, 0, 90))
    bvecs = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rotated = rotate_bvecs(np.array([0.0, 1000.0, 1000.0]), bvecs, affine,
                           np.stack([np.eye(4), turn, turn]), b0_threshold=B0_THRESHOLD)
    assert np.allclose(rotated, [[0, 0, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-9)


def test_fa_is_restored_by_the_correction(motion_run, philips):
    """FA of the moved scan matches the unmoved one once corrected with rotated b-vectors.

    Both scans go through the same processing before FA is compared: the
    correction also undoes the scan's own drift and its interpolation smooths
    away some of the noise that biases FA upwards, so raw and corrected FA
    differ by more than the simulated motion does.
    """
    mask = philips.mask.copy()
    mask[:, :, :20] = mask[:, :, 40:] = False  # a central slab keeps the fits short

    def fa(data, bvecs):
        return _fa(data, philips.bvals, bvecs, philips.affine, mask)[mask]

    unmoved, corrected = motion_run.unmoved, motion_run.corrected
    before = np.abs(fa(motion_run.moved, philips.bvecs) - fa(philips.data, philips.bvecs)).mean()
    reference = fa(unmoved.data, unmoved.bvecs_fsl)
    after = np.abs(fa(corrected.data, corrected.bvecs_fsl) - reference).mean()
    assert after < 0.5 * before, (after, before)


def test_result_does_not_depend_on_n_jobs():
    """sub-siemens01 (two b0s, so the b0-to-b0 stage runs too), part of the series, rigid."""
    scan, data, mask = _load("sub-siemens01")
    volumes = np.r_[0:7, 21:28]
    assert np.count_nonzero(scan.bvals[volumes] <= B0_THRESHOLD) == 2
    runs = [correct_motion(data[..., volumes], scan.bvals[volumes], scan.bvecs_fsl[volumes],
                           scan.affine, mask, b0_threshold=B0_THRESHOLD, model="rigid",
                           n_jobs=n_jobs) for n_jobs in (1, 2)]
    for field in ("data", "bvecs_fsl", "volume_affines", "parameters", "framewise_displacement"):
        assert np.array_equal(getattr(runs[0], field), getattr(runs[1], field)), field
    assert not np.allclose(runs[0].volume_affines[7], np.eye(4))  # the second b0 was registered


def _drop(data, slices):
    """Copy of ``data`` with ``slices`` of DROPOUT_VOLUME zeroed."""
    dropped = data.copy()
    dropped[:, :, slices, DROPOUT_VOLUME] = 0
    return dropped


@pytest.mark.parametrize("slices", [slice(1, None, 2), slice(24, 32)],
                         ids=["interleaved", "block"])
def test_dropout_flags_that_volume_only(philips, slices):
    found = detect_outlier_volumes(_drop(philips.data, slices), philips.bvals, philips.mask,
                                   b0_threshold=B0_THRESHOLD)
    assert found["volumes"] == [DROPOUT_VOLUME]
    flagged = [s for v, s in found["slice_dropout"] if v == DROPOUT_VOLUME]
    assert {v for v, _ in found["slice_dropout"]} == {DROPOUT_VOLUME}
    zeroed = np.arange(philips.data.shape[2])[slices]
    assert set(flagged) <= set(zeroed.tolist())
    assert len(flagged) >= 0.8 * len(zeroed)
    assert "signal dropout" in found["reasons"][DROPOUT_VOLUME]


def test_fa_without_the_flagged_volume_matches_the_clean_scan(philips):
    zeroed = slice(1, None, 2)
    dropped = _drop(philips.data, zeroed)
    found = detect_outlier_volumes(dropped, philips.bvals, philips.mask,
                                   b0_threshold=B0_THRESHOLD)
    kept = np.setdiff1d(np.arange(len(philips.bvals)), found["volumes"])
    mask = np.zeros_like(philips.mask)
    mask[:, :, zeroed] = philips.mask[:, :, zeroed]

    def fa(volumes):
        return _fa(dropped[..., volumes], philips.bvals[volumes], philips.bvecs[volumes],
                   philips.affine, mask)[mask]

    clean = _fa(philips.data, philips.bvals, philips.bvecs, philips.affine, mask)[mask]
    assert np.abs(fa(kept) - clean).mean() < 0.02
    # Keeping the dropped volume would have been far worse.
    assert np.abs(fa(np.arange(len(philips.bvals))) - clean).mean() > 0.05


@pytest.mark.parametrize("stem", RUNS)
def test_unmodified_scans_show_no_dropout_but_the_known_one(stem):
    scan, data, mask = _load(stem)
    found = detect_outlier_volumes(data, scan.bvals, mask, b0_threshold=B0_THRESHOLD)
    expected = KNOWN_DROPOUT.get(stem, [])
    assert found["slice_dropout"] == expected
    assert found["volumes"] == sorted({v for v, _ in expected})


def test_motion_rules_and_the_only_b0(philips, motion_run):
    # The real drift of sub-philips01 (framewise displacement up to ~4.4 mm) is not extreme.
    found = detect_outlier_volumes(philips.data, philips.bvals, philips.mask,
                                   b0_threshold=B0_THRESHOLD,
                                   motion_parameters=motion_run.unmoved.parameters)
    assert found["volumes"] == []
    parameters = np.zeros((len(philips.bvals), 6))
    parameters[0, 5] = 8.0     # the only b0 turned 8° about z: kept, since it is the only one
    parameters[12:, 0] = 6.0   # a 6 mm jump at volume 12
    found = detect_outlier_volumes(philips.data, philips.bvals, philips.mask,
                                   b0_threshold=B0_THRESHOLD, motion_parameters=parameters)
    assert found["volumes"] == [1, 12]  # volume 1: 8° on a 50 mm sphere = 7.0 mm
    assert "only b0" in found["reasons"][0] and "rotated 8.0°" in found["reasons"][0]
    assert "framewise displacement 7.0 mm" in found["reasons"][1]
    assert "framewise displacement 6.0 mm" in found["reasons"][12]
    assert found["thresholds"]["max_framewise_displacement_mm"] == 5.0
