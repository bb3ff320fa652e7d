"""The calibrated detection rule (pipeline/tractometry/localization.py) and the profiles' bootstrap
(pipeline/tractometry/uncertainty.py), on synthetic data with known noise."""

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.reconst.dti import TensorModel
from threadpoolctl import threadpool_limits

from pipeline.tractometry.localization import (
    DEFAULT_THRESHOLDS,
    healthy_covariance,
    localize_damage,
    window_means,
)
from pipeline.tractometry.uncertainty import bootstrap_profiles, wild_bootstrap_fa

N = 100
LEVEL_SPANS = [(0, 20, "pons"), (20, 40, "cerebral_peduncle"), (40, 65, "internal_capsule"),
               (65, 90, "corona_radiata"), (90, 100, "cortex")]
LEVELS = [name for a, b, name in LEVEL_SPANS for _ in range(b - a)]
NODE_LEVELS = {"left": LEVELS, "right": LEVELS}
NODE_XYZ = {"left": np.stack([np.full(N, -20.0), np.zeros(N), np.linspace(-35, 60, N)], 1),
            "right": np.stack([np.full(N, 20.0), np.zeros(N), np.linspace(-35, 60, N)], 1)}
MODEL = {"source": "test", "sd_by_level": {}, "sd_default": 0.02, "node_correlation": 0.9}
NOISE_SD, NOISE_RHO, N_BOOT = 0.02, 0.8, 200


def _correlated(rng, size, sd, rho):
    """Gaussian AR(1) profiles: (size, N)."""
    return rng.multivariate_normal(np.zeros(N), healthy_covariance(np.full(N, sd), rho),
                                   size=size, method="cholesky")


def _scan(rng, signal=None):
    """One synthetic scan: observed AI = signal + healthy asymmetry + measurement noise,
    and its bootstrap replicates (the noise redrawn around the observation)."""
    healthy = _correlated(rng, 1, MODEL["sd_default"], MODEL["node_correlation"])[0]
    observed = healthy + _correlated(rng, 1, NOISE_SD, NOISE_RHO)[0]
    if signal is not None:
        observed = observed + signal
    return observed, observed + _correlated(rng, N_BOOT, NOISE_SD, NOISE_RHO)


@threadpool_limits.wrap(limits=1)  # small matrices: BLAS threads only contend
def test_false_positive_rate_within_its_bound_over_1000_null_scans():
    rng = np.random.default_rng(0)
    rate = DEFAULT_THRESHOLDS["false_positive_rate"]
    thresholds = {"null_draws": 1000}
    findings = 0
    for _ in range(1000):
        ai, replicates = _scan(rng)
        result = localize_damage(ai, NODE_LEVELS, NODE_XYZ, ai_bootstrap=replicates,
                                 thresholds={**thresholds, "healthy_model": MODEL})
        findings += bool(result["umn_damage"])
    # 1000 Bernoulli draws at the stated rate: mean 10, SD ~3.1; allow 3 SD
    bound = 1000 * rate + 3 * np.sqrt(1000 * rate * (1 - rate))
    assert findings <= bound, findings


@threadpool_limits.wrap(limits=1)
def test_ignoring_the_healthy_asymmetry_would_break_the_bound():
    """The healthy-asymmetry term is what holds the rate: without it, the same null scans
    give many more findings (the test above is not passing by a lenient construction)."""
    rng = np.random.default_rng(1)
    no_model = {**MODEL, "sd_default": 0.0}
    findings = 0
    for _ in range(200):
        ai, replicates = _scan(rng)
        findings += bool(localize_damage(ai, NODE_LEVELS, NODE_XYZ, ai_bootstrap=replicates,
                                         thresholds={"null_draws": 500,
                                                     "healthy_model": no_model})["umn_damage"])
    assert findings > 0.1 * 200


def _lesion(start, width, depth):
    signal = np.zeros(N)
    signal[start:start + width] = depth
    return signal


@pytest.mark.parametrize("start, side, level", [(8, "left", "pons"), (50, "right",
                                                                        "internal_capsule")])
def test_focal_drop_found_with_side_and_level(start, side, level):
    rng = np.random.default_rng(2)
    depth = -0.12 if side == "left" else 0.12  # AI < 0: left FA lower
    ai, replicates = _scan(rng, _lesion(start, 8, depth))
    result = localize_damage(ai, NODE_LEVELS, NODE_XYZ, ai_bootstrap=replicates,
                             thresholds={"healthy_model": MODEL})
    assert result["umn_damage"] is True
    assert result["affected_side"] == side and result["level"] == level
    assert start - 2 <= result["peak_node"] < start + 10
    stat = result["statistic"]
    assert stat["value"] >= stat["threshold"] and stat["p_value"] <= 0.01
    assert all(seg["side"] == side for seg in result["segments"])


def test_detectable_drop_grows_with_the_noise():
    rng = np.random.default_rng(3)
    ai, replicates = _scan(rng)
    quiet = localize_damage(ai, NODE_LEVELS, NODE_XYZ, ai_bootstrap=replicates,
                            thresholds={"healthy_model": MODEL})["detectable_fa_drop"]
    noisy = localize_damage(ai, NODE_LEVELS, NODE_XYZ,
                            ai_bootstrap=ai + 3 * (replicates - ai),
                            thresholds={"healthy_model": MODEL})["detectable_fa_drop"]
    assert set(quiet) == {"pons", "cerebral_peduncle", "internal_capsule", "corona_radiata",
                          "cortex"}
    for level, drop in quiet.items():
        assert 0 < drop < noisy[level] < 1
    # two sources of SD ~0.02 over a 6-node window, threshold ~3.5: some 10-25 % of FA
    assert 0.05 < quiet["internal_capsule"] < 0.3


def test_fixed_rule_still_selectable():
    ai = np.zeros(N)
    ai[40:52] = -0.2
    result = localize_damage(ai, NODE_LEVELS, NODE_XYZ, thresholds={"method": "fixed-ai"})
    assert result["umn_damage"] is True and result["affected_side"] == "left"
    assert result["statistic"] is None
    with pytest.raises(ValueError, match="bootstrap"):
        localize_damage(ai, NODE_LEVELS, NODE_XYZ)


def test_window_means_match_a_loop():
    x = np.random.default_rng(4).normal(size=(3, 20))
    means = window_means(x, 6)
    assert means.shape == (3, 15)
    np.testing.assert_allclose(means[:, 7], x[:, 7:13].mean(axis=1))


# --------------------------------------------------------------------------- uncertainty

def _tensor_signal(n_voxels, sd, rng):
    """Signal of a prolate tensor (FA ~0.7) along x, 30 directions at b=1000 + 2 b0."""
    sphere = HemiSphere(xyz=rng.normal(size=(30, 3)))
    directions = disperse_charges(sphere, 2000)[0].vertices
    bvecs = np.vstack([[0, 0, 0], [0, 0, 0], directions])
    bvals = np.r_[0, 0, np.full(30, 1000.0)]
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    adc = (bvecs ** 2) @ evals
    clean = 1000.0 * np.exp(-bvals * adc)
    noisy = clean + rng.normal(0, sd, (n_voxels, len(bvals)))
    return np.abs(noisy), bvals, bvecs


def test_wild_bootstrap_spread_matches_repeated_acquisitions():
    """The SD of FA over bootstrap replicates of one voxel estimates the SD of FA over
    repeated noisy acquisitions of it (within 35 %, on average over voxels)."""
    rng = np.random.default_rng(5)
    signal, bvals, bvecs = _tensor_signal(200, 30.0, rng)
    deviations = wild_bootstrap_fa(signal, bvals, bvecs, np.eye(4), b0_threshold=50,
                                   n_boot=200, random_seed=0)
    assert deviations.shape == (200, 200)
    bootstrap_sd = deviations.std(axis=0).mean()
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    repeated_sd = TensorModel(gtab, fit_method="OLS").fit(signal).fa.std()
    assert bootstrap_sd == pytest.approx(repeated_sd, rel=0.35)
    again = wild_bootstrap_fa(signal, bvals, bvecs, np.eye(4), b0_threshold=50, n_boot=200,
                              random_seed=0)
    np.testing.assert_array_equal(deviations, again)


def test_profile_bootstrap_spread_is_the_standard_error_of_the_mean():
    """With equal weights and no FA noise, the replicates' SD at a node is the standard
    error of the streamlines' mean there."""
    rng = np.random.default_rng(6)
    values = rng.normal(0.6, 0.05, (400, 10))
    weights = np.full((400, 10), 1 / 400)
    voxels = np.zeros((400, 10), dtype=int)
    replicates = bootstrap_profiles(values, weights, voxels, np.zeros((500, 1)), random_seed=0)
    assert replicates.shape == (500, 10)
    np.testing.assert_allclose(replicates.mean(axis=0), values.mean(axis=0), atol=0.002)
    np.testing.assert_allclose(replicates.std(axis=0), values.std(axis=0) / np.sqrt(400),
                               rtol=0.2)


def test_peak_near_a_level_boundary_names_both_levels():
    import atlases
    from pipeline.tractometry.localization import levels_near_height

    assert levels_near_height(-30.0, atlases.LEVEL_Z_RANGES) == ["pons"]
    assert levels_near_height(-23.0, atlases.LEVEL_Z_RANGES) == ["pons", "cerebral_peduncle"]
    assert levels_near_height(-20.0, atlases.LEVEL_Z_RANGES) == ["pons", "cerebral_peduncle"]
    rng = np.random.default_rng(7)
    ai, replicates = _scan(rng, _lesion(18, 8, -0.12))
    heights = np.linspace(-40.0, 60.0, N)  # node 20 at about -19.8 mm: the boundary is -22
    result = localize_damage(ai, NODE_LEVELS, NODE_XYZ, ai_bootstrap=replicates,
                             thresholds={"healthy_model": MODEL},
                             node_mni_z={"left": heights, "right": heights})
    assert result["umn_damage"] is True
    z = heights[result["peak_node"]]
    expected = [name for name, (low, high) in atlases.LEVEL_Z_RANGES.items()
                if low - 3 <= z < high + 3]
    assert result["levels_near_boundary"] == expected and len(expected) in (1, 2)
