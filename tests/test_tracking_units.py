"""Unit tests of tractography (pipeline/tracking/propagation.py, selection.py) and
tractometry (pipeline/tractometry/profiles.py) on synthetic fields and hand-built
streamlines."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.affines import apply_affine

from pipeline.tracking import propagation as tracking
from pipeline.tracking.propagation import seeds_in_mask, track_dti_deterministic
from pipeline.tracking.selection import (
    clean_bundle,
    clip_from_height,
    common_start_height,
    heights_along,
    orient_inferior_first,
    select_tract,
)
from pipeline.tractometry.profiles import asymmetry_index, core_mahalanobis, tract_profiles

# LAS storage: voxel +x runs to world −x.
SHAPE = (20, 20, 40)
AFFINE = np.array([[-2.0, 0, 0, 19.0],
                   [0, 2.0, 0, -21.0],
                   [0, 0, 2.0, -40.0],
                   [0, 0, 0, 1.0]])
CENTRE_IJ = (10, 9)
TUBE_RADIUS_VOX = 3.0


def _tube_field():
    i, j, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    tube = (i - CENTRE_IJ[0]) ** 2 + (j - CENTRE_IJ[1]) ** 2 <= TUBE_RADIUS_VOX ** 2
    fa = np.where(tube, 0.7, 0.05)
    v1 = np.zeros(SHAPE + (3,))
    v1[..., 2] = 1.0  # voxel z everywhere
    mask = np.ones(SHAPE, dtype=bool)
    return v1, fa, mask, tube


@pytest.fixture(scope="module")
def tube_tracks():
    """Streamlines of the tube for n_jobs = 1, 2, 3 with 5 seed chunks."""
    v1, fa, mask, tube = _tube_field()
    seeds = seeds_in_mask(tube, AFFINE, seeds_per_voxel=1, random_seed=7)
    calls = []
    original = tracking.parallel_map

    def spy(function, argument_tuples, *, n_jobs, **options):
        argument_tuples = list(argument_tuples)
        calls.append((n_jobs, [len(args[0]) for args in argument_tuples]))
        return original(function, argument_tuples, n_jobs=n_jobs, **options)

    mp = pytest.MonkeyPatch()
    mp.setattr(tracking, "SEED_CHUNK_SIZE", int(np.ceil(len(seeds) / 5)))
    mp.setattr(tracking, "parallel_map", spy)
    try:
        out = {n: track_dti_deterministic(seeds, v1, fa, mask, AFFINE, n_jobs=n, random_seed=3)
               for n in (1, 2, 3)}
    finally:
        mp.undo()
    return seeds, tube, out, calls


def test_seed_chunking_gives_several_chunks(tube_tracks):
    seeds, tube, _, calls = tube_tracks
    assert len(seeds) == int(tube.sum())  # one seed per tube voxel
    assert [n for n, _ in calls] == [1, 2, 3]
    for _, sizes in calls:
        assert len(sizes) == 5 and sum(sizes) == len(seeds)
    # the patches were undone
    assert tracking.SEED_CHUNK_SIZE == 4000


def test_tracking_follows_the_tube_along_world_z(tube_tracks):
    seeds, tube, out, _ = tube_tracks
    streamlines = out[1]
    inv = np.linalg.inv(AFFINE)
    centre_world = apply_affine(AFFINE, [CENTRE_IJ[0], CENTRE_IJ[1], 0])[:2]
    for s in streamlines:
        assert s.dtype == np.float32 and s.ndim == 2 and s.shape[1] == 3
        # straight along world z, spanning (almost) the whole tube length of 80 mm
        assert np.ptp(s[:, 0]) < 1e-3 and np.ptp(s[:, 1]) < 1e-3
        assert np.ptp(s[:, 2]) > 70.0
        # inside the tube (in voxel terms) everywhere
        ijk = np.rint(apply_affine(inv, s)).astype(int)
        assert np.all((ijk >= 0) & (ijk < np.array(SHAPE)))
        assert tube[tuple(ijk.T)].all()
        assert np.hypot(*(s[0, :2] - centre_world)) <= TUBE_RADIUS_VOX * 2.0 + 1.0
    # Streamlines come in seed order: match each to its seed by world (x, y).
    kept = np.zeros(len(seeds), dtype=bool)
    j = 0
    for i, seed in enumerate(seeds):
        if j < len(streamlines) and np.allclose(streamlines[j][0, :2], seed[:2], atol=1e-4):
            kept[i] = True
            j += 1
    assert j == len(streamlines)
    # Seeds in the tube's core all give a streamline; only some at the rim (where the
    # interpolated FA falls towards fa_stop) do not.
    seed_ijk = apply_affine(inv, seeds)
    r = np.hypot(seed_ijk[:, 0] - CENTRE_IJ[0], seed_ijk[:, 1] - CENTRE_IJ[1])
    assert kept[r <= 2.0].all()
    assert kept.mean() > 0.9


def test_tracking_is_identical_for_any_n_jobs(tube_tracks):
    _, _, out, _ = tube_tracks
    ref = out[1]
    for n in (2, 3):
        assert len(out[n]) == len(ref)
        assert all(np.array_equal(a, b) for a, b in zip(ref, out[n]))


def _dipys_eudx(seeds, v1, fa, mask, affine, *, fa_stop, max_angle_deg, step_mm,
                min_length_mm, max_length_mm):
    """DIPY's ``eudx_tracking`` on the same peaks, pairing seeds and peaks itself."""
    from dipy.direction.peaks import PeaksAndMetrics
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import eudx_tracking

    pam = PeaksAndMetrics()
    pam.peak_indices = np.where(mask, np.cumsum(mask).reshape(mask.shape) - 1, 0)[..., None]
    pam.peak_values = np.where(mask, fa, 0.0)[..., None]
    pam.odf_vertices = v1[mask]
    return [np.asarray(s, dtype=np.float32) for s in eudx_tracking(
        seeds, ThresholdStoppingCriterion(fa, fa_stop), affine, pam=pam, pmf_threshold=fa_stop,
        step_size=step_mm, max_angle=max_angle_deg, min_len=min_length_mm,
        max_len=max_length_mm, nbr_threads=1)]


def test_tensor_tracking_equals_dipys_eudx_point_for_point():
    """Our EuDX kernel and seed handling against DIPY's: the same streamlines, bit for
    bit, on a field of random directions and FA with seeds everywhere (outside the
    mask, in zero-FA voxels, beyond the grid's edge), LAS storage, anisotropic voxels."""
    rng = np.random.default_rng(5)
    affine = AFFINE @ np.diag([1.0, 1.25, 0.75, 1.0])
    v1 = rng.normal(size=SHAPE + (3,))
    v1[..., 2] += 3.0  # mostly along z, so that streamlines get long
    v1 /= np.linalg.norm(v1, axis=-1, keepdims=True)
    fa = rng.uniform(0.15, 0.9, size=SHAPE)
    mask = np.ones(SHAPE, dtype=bool)
    mask[:3] = False  # no peaks there
    fa[5:7] = 0.0
    seeds = apply_affine(affine, rng.uniform(-1.0, np.array(SHAPE), size=(2000, 3)))
    settings = dict(fa_stop=0.2, max_angle_deg=45.0, step_mm=0.5, min_length_mm=5.0,
                    max_length_mm=40.0)
    ours = track_dti_deterministic(seeds, v1, fa, mask, affine, **settings)
    theirs = _dipys_eudx(seeds, v1, fa, mask, affine, **settings)
    lengths = np.array([len(s) for s in theirs])
    assert len(theirs) > 500 and lengths.min() < 20 and lengths.max() > 60
    assert len(ours) == len(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_tensor_tracking_that_runs_out_of_steps_ends_as_dipys():
    """Seeds on the bottom face of a uniform field: the backward half leaves the grid at
    once and the forward one runs out of its ``max_length`` steps, where DIPY drops the
    last point it reached; ours the same."""
    v1, fa, mask, tube = _tube_field()
    seed_ijk = np.column_stack([np.full(50, CENTRE_IJ[0], float), np.full(50, CENTRE_IJ[1], float),
                                np.linspace(-0.45, 0.0, 50)])
    settings = dict(fa_stop=0.2, max_angle_deg=45.0, step_mm=0.5, min_length_mm=5.0,
                    max_length_mm=10.0)
    ours = track_dti_deterministic(apply_affine(AFFINE, seed_ijk), v1, fa, mask, AFFINE,
                                   **settings)
    theirs = _dipys_eudx(apply_affine(AFFINE, seed_ijk), v1, fa, mask, AFFINE, **settings)
    # 20 steps allowed: 19 points forward, and the seed's backward step kept or not
    assert {len(s) for s in theirs} == {19, 20}
    assert len(ours) == len(theirs) > 45
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_tracking_stops_at_low_fa():
    v1, fa, mask, tube = _tube_field()
    fa = fa.copy()
    fa[:, :, 25:] = 0.05  # tube ends at voxel z 24
    seeds = apply_affine(AFFINE, np.array([[CENTRE_IJ[0], CENTRE_IJ[1], 10.0]]))
    (s,) = track_dti_deterministic(seeds, v1, fa, mask, AFFINE, min_length_mm=5.0)
    zmax_world = apply_affine(AFFINE, [0, 0, 25])[2]
    assert s[:, 2].max() <= zmax_world
    assert s[:, 2].max() >= zmax_world - 2.0
    assert s[:, 2].min() <= AFFINE[2, 3] + 1.0  # ran to the bottom of the grid


# --------------------------------------------------------------------------- selection


def _world(points_ijk):
    return apply_affine(AFFINE, np.asarray(points_ijk, dtype=float))


def test_select_tract_required_and_forbidden():
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[2:5, 2:5, 5] = 1     # required, inferior
    labels[2:5, 2:5, 30] = 2    # required, superior
    labels[10:13, 2:5, 18] = 9  # forbidden
    z = np.arange(0, 36, 0.5)
    def vertical(i, j):
        return _world(np.stack([np.full_like(z, i), np.full_like(z, j), z], 1))
    sls = [
        vertical(3, 3),   # 0: passes 1 and 2 → keep
        vertical(11, 3),  # 1: passes forbidden 9 only → drop
        vertical(3, 8),   # 2: passes nothing → drop
        # 3: passes 1, 9 (detour) and 2 → drop
        _world(np.concatenate([
            np.stack([np.full(25, 3.0), np.full(25, 3.0), np.linspace(0, 12, 25)], 1),
            np.stack([np.linspace(3, 11, 17), np.full(17, 3.0), np.linspace(12.5, 18, 17)], 1),
            np.stack([np.linspace(11, 3, 17), np.full(17, 3.0), np.linspace(18.5, 22, 17)], 1),
            np.stack([np.full(25, 3.0), np.full(25, 3.0), np.linspace(22.5, 34, 25)], 1),
        ])),
        _world([[4, 4, z_] for z_ in np.arange(0, 20, 0.5)]),  # 4: only 1 → drop
        vertical(4, 2)[::-1],  # 5: passes 1 and 2, superior first → keep
    ]
    kept = select_tract(sls, labels, AFFINE, required=(1, 2), forbidden=(9,))
    assert len(kept) == 2
    assert kept[0] is sls[0] and kept[1] is sls[5]
    # without the forbidden label the detouring streamline is kept too
    kept = select_tract(sls, labels, AFFINE, required=(1, 2), forbidden=())
    assert [id(s) for s in kept] == [id(sls[i]) for i in (0, 3, 5)]
    assert select_tract([], labels, AFFINE, required=(1,), forbidden=()) == []


def test_select_tract_outside_grid_is_label_zero():
    labels = np.ones(SHAPE, dtype=np.int16)
    far = _world([[-20.0, 3, z] for z in range(10)])
    inside = _world([[3.0, 3, z] for z in range(10)])
    kept = select_tract([far, inside], labels, AFFINE, required=(1,), forbidden=())
    assert len(kept) == 1 and kept[0] is inside


def test_orient_inferior_first_by_height_not_world_z():
    """The end with the lower MNI height comes first, even where world z says otherwise
    (a side-lying head); the heights are flipped with their streamline."""
    up = np.array([[0, 0, -10.0], [1, 0, 0.0], [2, 0, 10.0]])
    down = np.array([[5, 5, 30.0], [5, 6, 20.0], [5, 7, -5.0]])
    heights = [np.array([-30.0, -20.0, -10.0]), np.array([-40.0, -35.0, -30.0])]
    out, out_heights = orient_inferior_first([up, down], heights)
    assert out[0] is up and np.array_equal(out_heights[0], heights[0])
    np.testing.assert_array_equal(out[1], down)       # low height first already
    flipped, flipped_heights = orient_inferior_first([up], [heights[0][::-1]])
    np.testing.assert_array_equal(flipped[0], up[::-1])
    np.testing.assert_array_equal(flipped_heights[0], heights[0])
    assert down[0, 2] == 30.0  # input untouched


def test_heights_along_samples_the_map_nan_outside():
    heights = np.arange(SHAPE[2], dtype=float)[None, None, :] * np.ones(SHAPE)
    pts = _world([[1.0, 1.0, 4.0], [1.0, 1.0, 7.0], [1.0, 1.0, 500.0]])
    (values,) = heights_along([pts], heights, AFFINE)
    np.testing.assert_allclose(values[:2], [4.0, 7.0])
    assert np.isnan(values[2])


def test_common_start_height_is_the_higher_of_floor_and_both_reaches():
    # side A: lowest points -50 ... -41; side B: -30 for all but one
    side_a = [np.array([-50.0 + k, 0.0]) for k in range(10)]
    side_b = [np.array([-30.0, 0.0])] * 9 + [np.array([-60.0, 0.0])]
    assert common_start_height([side_a, side_a], floor=-55.0) == pytest.approx(
        np.quantile(np.arange(-50.0, -40.0), 0.8))
    assert common_start_height([side_a, side_b], floor=-55.0) == pytest.approx(-30.0)
    assert common_start_height([side_a, side_a], floor=-20.0) == -20.0
    assert np.isnan(common_start_height([side_a, []], floor=-55.0))


def test_clip_from_height_to_the_first_upper_roi_point():
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[:, :, 3] = 2         # an "upper" label below the start height: ignored
    labels[:, :, 24:26] = 2     # upper ROI: world z in [7, 11)
    zw = np.arange(-39.75, 38.0, 0.5)
    pts = np.stack([np.full_like(zw, 1.0), np.full_like(zw, -3.0), zw], 1)
    heights = zw + 100.0        # any monotonic height map
    (clipped,) = clip_from_height([pts], [heights], labels, AFFINE, start_height=75.0,
                                  upper=2)
    assert clipped[0, 2] == pytest.approx(-24.75)   # first point above height 75 (z -25)
    assert clipped[-1, 2] == pytest.approx(7.25)    # first point in the upper ROI
    np.testing.assert_array_equal(clipped, pts[(zw > -25) & (zw <= 7.25)])


def test_clip_from_height_drops_what_misses_the_height_or_the_roi():
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[:, :, 24:26] = 2
    zw = np.arange(-39.75, 38.0, 0.5)
    full = np.stack([np.zeros_like(zw), np.zeros_like(zw), zw], 1)
    starts_high = full[zw > -20]
    stops_low = full[zw < 0]
    out = clip_from_height([starts_high, full, stops_low],
                           [starts_high[:, 2], full[:, 2], stops_low[:, 2]], labels, AFFINE,
                           start_height=-25.0, upper=2)
    assert len(out) == 1 and out[0][0, 2] == pytest.approx(-24.75)
    assert clip_from_height([], [], labels, AFFINE, start_height=-25.0, upper=2) == []
    assert clip_from_height([full], [full[:, 2]], labels, AFFINE, start_height=np.nan,
                            upper=2) == []


# --------------------------------------------------------------------------- cleaning / tractometry

def _parallel_bundle(n=50, seed=0):
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.linspace(-4, 4, 10), np.linspace(-2, 2, 5))
    offsets = np.stack([gx.ravel(), gy.ravel()], 1)[:n]
    out = []
    for x, y in offsets:
        z0, z1 = rng.uniform(-1, 1), 80 + rng.uniform(-1, 1)
        z = np.linspace(z0, z1, 60)
        out.append(np.stack([np.full_like(z, x), np.full_like(z, y), z], 1))
    return out


def test_clean_bundle_removes_far_outlier():
    bundle = _parallel_bundle()
    z = np.linspace(0, 80, 60)
    outlier = np.stack([np.full_like(z, 40.0), np.zeros_like(z), z], 1)
    mixed = bundle[:20] + [outlier] + bundle[20:]
    cleaned = clean_bundle(mixed)
    assert len(cleaned) == 50
    assert all(a is b for a, b in zip(cleaned, bundle))
    # the unpolluted bundle is left alone
    assert len(clean_bundle(bundle)) == 50


def test_clean_bundle_removes_long_outlier():
    bundle = _parallel_bundle()
    z = np.linspace(0, 160, 60)
    long_one = np.stack([np.zeros_like(z), np.zeros_like(z), z], 1)
    cleaned = clean_bundle(bundle + [long_one])
    assert len(cleaned) == 50 and not any(s is long_one for s in cleaned)


def test_clean_bundle_keeps_small_bundles():
    bundle = _parallel_bundle(10)
    z = np.linspace(0, 80, 60)
    outlier = np.stack([np.full_like(z, 40.0), np.zeros_like(z), z], 1)
    assert len(clean_bundle(bundle + [outlier])) == 11  # fewer than min_streamlines


def test_core_mahalanobis_of_parallel_lines():
    offsets = np.array([0.0, 1.0, 2.0, 5.0, -3.0, 7.0])
    z = np.linspace(0, 50, 20)
    resampled = np.stack([np.stack([np.full_like(z, o), np.full_like(z, 2.0), z], 1)
                          for o in offsets])
    d = core_mahalanobis(resampled)
    assert d.shape == (6, 20)
    expected = np.abs(offsets - offsets.mean()) / offsets.std()  # population std
    np.testing.assert_allclose(d, np.repeat(expected[:, None], 20, axis=1), rtol=1e-9)


def test_core_mahalanobis_two_dimensional_offsets():
    # (±1, 0) and (0, ±2): var_x = 0.5, var_y = 2, no covariance
    offs = np.array([[1.0, 0], [-1.0, 0], [0, 2.0], [0, -2.0]])
    z = np.linspace(0, 10, 5)
    resampled = np.stack([np.stack([np.full_like(z, x), np.full_like(z, y), z], 1)
                          for x, y in offs])
    d = core_mahalanobis(resampled)
    np.testing.assert_allclose(d, np.sqrt(2.0), rtol=1e-9)


def test_core_mahalanobis_matches_per_node_reference():
    """Batched result equals a plain per-node loop with the full population covariance."""
    rng = np.random.default_rng(5)
    base = np.stack([np.zeros(30), np.zeros(30), np.linspace(0, 60, 30)], 1)
    mixing = np.array([[1.0, 1.5, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 0.3]])  # correlated
    resampled = np.stack([base + rng.normal(size=(30, 3)) @ mixing + rng.normal(0, 1, 3)
                          for _ in range(40)])
    ref = np.zeros((40, 30))
    for node in range(30):
        pts = resampled[:, node]
        cov = np.cov(pts.T, ddof=0)
        assert cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]) > 0.3  # off-diagonal terms matter
        delta = pts - pts.mean(axis=0)
        ref[:, node] = np.sqrt(np.einsum("sk,kl,sl->s", delta, np.linalg.inv(cov), delta))
    np.testing.assert_allclose(core_mahalanobis(resampled), ref, rtol=1e-8)


def test_tract_profiles_monotonic_gradient_inferior_first():
    k = np.arange(SHAPE[2])
    fa = np.broadcast_to(0.2 + 0.01 * k, SHAPE).astype(np.float64).copy()
    # streamlines from voxel z 3 to 35, inferior first, a few mm apart in x/y
    bundle = []
    for di, dj in [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]:
        zz = np.linspace(3, 35, 65)
        ijk = np.stack([np.full_like(zz, 10 + di), np.full_like(zz, 9 + dj), zz], 1)
        bundle.append(apply_affine(AFFINE, ijk))
    prof = tract_profiles(bundle, {"fa": fa}, AFFINE, n_nodes=50)
    p = prof["fa"]
    assert p.shape == (50,) and prof["xyz"].shape == (50, 3)
    assert np.all(np.diff(p) > 0)
    assert prof["xyz"][0, 2] < prof["xyz"][-1, 2]
    # node 0 is the inferior end (voxel z 3), the last node the superior end (voxel z 35)
    assert p[0] == pytest.approx(0.23, abs=1e-6)
    assert p[-1] == pytest.approx(0.55, abs=1e-6)
    # FA at each node equals the gradient evaluated at the node's height
    k_node = (prof["xyz"][:, 2] - AFFINE[2, 3]) / AFFINE[2, 2]
    np.testing.assert_allclose(p, 0.2 + 0.01 * k_node, atol=1e-6)
    # an empty bundle gives NaN profiles
    empty = tract_profiles([], {"fa": fa}, AFFINE, n_nodes=50)
    assert np.isnan(empty["fa"]).all() and np.isnan(empty["xyz"]).all()


def test_asymmetry_index():
    assert asymmetry_index(0.6, 0.4) == pytest.approx(0.2)
    assert asymmetry_index(0.4, 0.6) == pytest.approx(-0.2)
    np.testing.assert_allclose(asymmetry_index([0.5, 0.3], [0.5, 0.1]), [0.0, 0.5])
    assert np.isnan(asymmetry_index(0.0, 0.0))


def test_parallel_map_keeps_cheap_work_in_this_process(monkeypatch):
    import os

    import pipeline.parallel as parallel

    monkeypatch.setattr(parallel, "WORKER_START_SECONDS", 4.0)
    assert set(parallel.parallel_map(os.getpid, [()] * 4, n_jobs=2)) == {os.getpid()}
    monkeypatch.setattr(parallel, "WORKER_START_SECONDS", 0.0)
    pids = parallel.parallel_map(os.getpid, [()] * 4, n_jobs=2)
    assert pids[0] == os.getpid()  # the timed first call
    assert set(pids[1:]) - {os.getpid()}  # the rest went to workers


# --------------------------------------------------------------------------- CSD tracking

CROSSING_Z = (17, 23)  # voxel z band where a stronger left-right bundle crosses the tube


@pytest.fixture(scope="module")
def crossing_field():
    """The tube along world z crossed, over 12 mm, by a stronger bundle along world x.

    DW signals are simulated (two tensors, no noise) and deconvolved with
    :func:`pipeline.reconstruction.fodf.fit_csd`; the tensor's principal direction in the
    crossing points along x.
    """
    from dipy.core.gradients import gradient_table
    from dipy.data import get_sphere
    from dipy.sims.voxel import multi_tensor

    from pipeline.io.dwi import voxel_frame_to_fsl_bvecs
    from pipeline.reconstruction import fodf, tensor

    directions = get_sphere(name="repulsion100").vertices[:60]
    bvals = np.r_[np.zeros(3), np.full(len(directions), 1000.0)]
    bvecs_voxel = np.r_[np.zeros((3, 3)), directions]
    gtab = gradient_table(bvals, bvecs=bvecs_voxel)
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    along_z, _ = multi_tensor(gtab, np.array([evals]), S0=100, angles=[(0, 0)],
                              fractions=[100], snr=None)
    crossing, _ = multi_tensor(gtab, np.array([evals, evals]), S0=100,
                               angles=[(0, 0), (90, 0)], fractions=[40, 60], snr=None)
    background, _ = multi_tensor(gtab, np.array([[0.8e-3] * 3]), S0=100, angles=[(0, 0)],
                                 fractions=[100], snr=None)
    _, _, _, tube = _tube_field()
    in_crossing = np.zeros(SHAPE, dtype=bool)
    in_crossing[:, :, CROSSING_Z[0]:CROSSING_Z[1]] = True
    data = np.broadcast_to(background, SHAPE + (len(bvals),)).copy()
    data[tube] = along_z
    data[tube & in_crossing] = crossing
    bvecs_fsl = voxel_frame_to_fsl_bvecs(bvecs_voxel, AFFINE)
    mask = np.ones(SHAPE, dtype=bool)
    maps = tensor.fit_dti(data, bvals, bvecs_fsl, AFFINE, mask, b0_threshold=50)
    sh, info = fodf.fit_csd(data, bvals, bvecs_fsl, AFFINE, mask, maps["fa"], b0_threshold=50,
                            shell=1000, sh_order=6, fit_mask=tube)
    stop_map = np.where(tube, 0.7, 0.05)  # the crossing is not a stopping region
    seeds = seeds_in_mask(tube & ~in_crossing, AFFINE, seeds_per_voxel=1, random_seed=7)
    return {"sh": sh, "info": info, "maps": maps, "stop_map": stop_map, "tube": tube,
            "seeds": seeds, "in_crossing": in_crossing}


def test_tensor_points_across_the_tube_in_the_crossing(crossing_field):
    f = crossing_field
    core = f["tube"] & f["in_crossing"]
    assert np.all(np.abs(f["maps"]["v1"][core][:, 0]) > 0.9)  # voxel x = world x
    # the response comes from the single-fibre part of the tube
    evals = f["info"]["response_evals"]
    assert (evals[0] == pytest.approx(1.7e-3, rel=0.05)
            and evals[1] == pytest.approx(0.3e-3, rel=0.1))


@pytest.mark.parametrize("direction", ["det", "prob"])
def test_csd_tracking_goes_through_the_crossing_where_the_tensor_stops(crossing_field,
                                                                       direction):
    f = crossing_field
    csd = tracking.track_csd(f["seeds"], f["sh"], f["stop_map"], AFFINE, direction=direction,
                             random_seed=3)
    dti = track_dti_deterministic(f["seeds"], f["maps"]["v1"], f["stop_map"],
                                  np.ones(SHAPE, dtype=bool), AFFINE, random_seed=3)
    csd_span = np.array([np.ptp(s[:, 2]) for s in csd])
    dti_span = np.array([np.ptp(s[:, 2]) for s in dti])
    # the tube is 80 mm long; the crossing sits 34-46 mm up
    assert len(csd) > 0.9 * len(f["seeds"])
    # measured: det 0.64, prob 0.41 (it wanders, and may leave the 6 mm tube)
    assert np.mean(csd_span > 70) > {"det": 0.5, "prob": 0.3}[direction]
    assert np.mean(dti_span > 70) < 0.05
    # those that get through stay in the tube, straight across the crossing bundle
    inv = np.linalg.inv(AFFINE)
    through = [s for s, span in zip(csd, csd_span) if span > 70]
    radius = [np.hypot(*(apply_affine(inv, s)[:, :2] - CENTRE_IJ).T).max() for s in through]
    assert max(radius) <= TUBE_RADIUS_VOX + 1.0


def test_probabilistic_csd_matches_dipys_probabilistic_tracker(crossing_field):
    """Our cone tracker against ``dipy.tracking.tracker.probabilistic_tracking`` with the
    same seeds and settings: the same model, so the same distribution of streamlines
    (the random draws differ)."""
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import probabilistic_tracking

    from pipeline.reconstruction import fodf

    f = crossing_field
    settings = dict(step_mm=0.5, max_angle_deg=45.0, min_length_mm=20.0, max_length_mm=250.0)
    ours = tracking.track_csd(f["seeds"], f["sh"], f["stop_map"], AFFINE, direction="prob",
                              fa_stop=0.2, pmf_threshold=0.1, random_seed=3, **settings)
    theirs = list(probabilistic_tracking(
        f["seeds"], ThresholdStoppingCriterion(f["stop_map"], 0.2), AFFINE, sh=f["sh"],
        sphere=tracking.TRACKING_SPHERE, basis_type=fodf.SH_BASIS, legacy=False,
        pmf_threshold=0.1, step_size=0.5, max_angle=45.0, min_len=20.0, max_len=250.0,
        random_seed=3))

    def summary(streamlines):
        span = np.array([np.ptp(s[:, 2]) for s in streamlines])
        return {"kept": len(streamlines) / len(f["seeds"]), "through": np.mean(span > 70),
                "mean_points": np.mean([len(s) for s in streamlines])}

    a, b = summary(ours), summary(theirs)
    # measured over random seeds 1-6: kept 0.96 / 0.96, through the crossing 0.424 / 0.415
    # (binomial sd of one run 0.023), mean points 126 / 126, ours / DIPY's
    assert a["kept"] == pytest.approx(b["kept"], abs=0.05)
    assert a["through"] == pytest.approx(b["through"], abs=0.08)
    assert a["mean_points"] == pytest.approx(b["mean_points"], rel=0.1)


def test_deterministic_csd_equals_dipys_deterministic_tracker(crossing_field):
    """The cone kernel's deterministic mode against ``dipy.tracking.tracker.
    deterministic_tracking``: the same streamlines, point for point (ours in single
    precision), through the crossing too."""
    from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
    from dipy.tracking.tracker import deterministic_tracking

    from pipeline.reconstruction import fodf

    f = crossing_field
    ours = tracking.track_csd(f["seeds"], f["sh"], f["stop_map"], AFFINE, direction="det",
                              fa_stop=0.2, pmf_threshold=0.1, step_mm=0.5, max_angle_deg=45.0,
                              min_length_mm=20.0, max_length_mm=250.0, n_jobs=2)
    theirs = list(deterministic_tracking(
        f["seeds"], ThresholdStoppingCriterion(f["stop_map"], 0.2), AFFINE, sh=f["sh"],
        sphere=tracking.TRACKING_SPHERE, basis_type=fodf.SH_BASIS, legacy=False,
        pmf_threshold=0.1, step_size=0.5, max_angle=45.0, min_len=20.0, max_len=250.0))
    assert len(ours) == len(theirs) > 0.9 * len(f["seeds"])
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_probabilistic_csd_is_identical_for_any_n_jobs(crossing_field, monkeypatch):
    f = crossing_field
    monkeypatch.setattr(tracking, "SEED_CHUNK_SIZE", int(np.ceil(len(f["seeds"]) / 5)))
    runs = {n: tracking.track_csd(f["seeds"], f["sh"], f["stop_map"], AFFINE, direction="prob",
                                  n_jobs=n, random_seed=11) for n in (1, 2, 3)}
    assert len(runs[1]) > 0
    for n in (2, 3):
        assert len(runs[n]) == len(runs[1])
        assert all(np.array_equal(a, b) for a, b in zip(runs[1], runs[n]))
    # and it is probabilistic: another seed gives other streamlines
    other = tracking.track_csd(f["seeds"], f["sh"], f["stop_map"], AFFINE, direction="prob",
                               random_seed=12)
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(runs[1], other))


# --------------------------------------------------------------------------- lesion bridging

def test_corridor_is_the_tube_around_the_waypoints():
    shape, affine = (30, 30, 30), np.diag([2.0, 2.0, 2.0, 1.0])
    corridor = tracking.corridor_mask(np.array([[10.0, 10.0, 0.0], [10.0, 10.0, 40.0],
                                                [40.0, 10.0, 40.0]]), shape, affine,
                                      radius_mm=4.0)
    ijk = np.argwhere(corridor)
    xyz = apply_affine(affine, ijk)
    # distance to the nearest of the two segments ≤ 4 mm, and every such voxel is in
    d1 = np.hypot(xyz[:, 0] - 10, xyz[:, 1] - 10) * (xyz[:, 2] <= 40) + \
        np.where(xyz[:, 2] > 40, np.linalg.norm(xyz - [10, 10, 40], axis=1), 0)
    d2 = np.hypot(xyz[:, 1] - 10, xyz[:, 2] - 40)
    assert np.all(np.minimum(d1, d2) <= 4.0 + 1e-9)
    assert corridor[5, 5, 10] and corridor[15, 5, 20] and not corridor[5, 5, 25]
    assert corridor[14, 6, 21]  # (28, 12, 42) mm: 2.8 mm from the second segment


def test_tracking_crosses_a_focal_low_fa_gap_only_inside_the_corridor():
    """A lesion-like FA drop (0.7 → 0.15 over 6 mm) cuts the tube unless bridged."""
    v1, fa, mask, tube = _tube_field()
    lesion = tube.copy()
    lesion[:, :, :18] = False
    lesion[:, :, 21:] = False
    fa = np.where(lesion, 0.15, fa)
    seeds = seeds_in_mask(tube & ~lesion, AFFINE, seeds_per_voxel=1, random_seed=7)
    plain = track_dti_deterministic(seeds, v1, fa, mask, AFFINE)
    bridged_map = tracking.bridge_low_fa(fa, tube, fa_stop=0.2, gap_fa=0.1)
    bridged = track_dti_deterministic(seeds, v1, bridged_map, mask, AFFINE)
    assert np.allclose(bridged_map[lesion], 0.21) and np.all(bridged_map[~tube] == 0.05)
    assert max(np.ptp(s[:, 2]) for s in plain) < 45   # nothing crosses the 6 mm gap
    # straight along voxel z: a streamline's (i, j) is its seed's; from the tube's core
    # (where interpolation with the background stays above fa_stop) all get through
    inv = np.linalg.inv(AFFINE)
    radius = np.array([np.hypot(*(apply_affine(inv, s[0])[:2] - CENTRE_IJ)) for s in bridged])
    span = np.array([np.ptp(s[:, 2]) for s in bridged])
    assert (radius <= 2.0).sum() > 100 and np.all(span[radius <= 2.0] > 70)
    # outside the corridor the gap still stops tracking
    assert max(np.ptp(s[:, 2]) for s in track_dti_deterministic(
        seeds, v1, tracking.bridge_low_fa(fa, np.zeros_like(tube), fa_stop=0.2, gap_fa=0.1),
        mask, AFFINE)) < 45
