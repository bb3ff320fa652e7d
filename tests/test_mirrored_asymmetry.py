"""The mirrored-asymmetry rule (pipeline.tractometry.mirrored) on synthetic template-space
FA with known noise: calibration over 1000 null draws, a focal lesion found on its side,
and the bundled model's shape."""

import nibabel as nib
import numpy as np
import pytest

import atlases
from pipeline.tractometry import mirrored

SHAPE = (21, 14, 40)
# 2 mm voxels, x = 0 at the centre of the first axis: mirror-symmetric like the template.
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20.0, -10.0, -10.0]
LEVELS = (np.where(np.arange(SHAPE[2]) < 20, 2, 4)[None, None, :] * np.ones(SHAPE, int),
          {2: "pons", 4: "internal_capsule"})


def synthetic_volume():
    """A symmetric FA brain: a white-matter block with a bright 'CST' column in each
    hemisphere; returns (base FA, left CST volume, left white matter)."""
    fa = np.zeros(SHAPE)
    fa[2:19, 2:12, 2:38] = 0.3
    fa[5:8, 5:9, 2:38] = 0.6
    fa[13:16, 5:9, 2:38] = 0.6
    volume = np.zeros(SHAPE, bool)
    volume[5:8, 5:9, 2:38] = True
    white_matter = np.zeros(SHAPE, bool)
    white_matter[3:10, 2:12, 2:38] = True
    white_matter[5:8, 4:10, :] = False
    return fa, volume, white_matter


def healthy_scan(rng, base, person, noise):
    """A healthy scan: the person's own fixed asymmetry plus this scan's noise."""
    return base * (1 + person) * (1 + noise * rng.standard_normal(SHAPE))


def fitted_model(rng, base, volume, white_matter, *, n_people=10, scans_each=4):
    people = [0.03 * rng.standard_normal(SHAPE) for _ in range(n_people)]
    maps, scales, volunteers = [], [], []
    for p, person in enumerate(people):
        for _ in range(scans_each):
            ai = mirrored.mirrored_ai(healthy_scan(rng, base, person, rng.uniform(0.03, 0.08)))
            maps.append(ai)
            scales.append(mirrored.scan_scale(ai, white_matter))
            volunteers.append(p)
    return mirrored.fit_model(maps, scales, volume, white_matter, volunteers, AFFINE)


def test_mirror_is_exact_on_the_bundled_template_and_refused_off_centre():
    template = nib.load(atlases.template_fa_path())
    mirrored.check_midline(template.affine, template.shape)
    centres = nib.affines.apply_affine(template.affine, [[0, 0, 0], [90, 0, 0], [45, 0, 0]])
    assert centres[0, 0] == -centres[1, 0] and centres[2, 0] == 0
    shifted = template.affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(ValueError, match="mirror-symmetric"):
        mirrored.check_midline(shifted, template.shape)


def test_false_positive_rate_holds_over_1000_null_draws():
    """New healthy people, never seen by the model: findings at the stated rate."""
    rng = np.random.default_rng(1)
    base, volume, white_matter = synthetic_volume()
    model = fitted_model(rng, base, volume, white_matter, n_people=20)
    rate, draws = 0.05, 1000
    found = 0
    for _ in range(draws):
        scan = healthy_scan(rng, base, 0.03 * rng.standard_normal(SHAPE), rng.uniform(0.03, 0.08))
        found += mirrored.mirrored_finding(scan, np.zeros(SHAPE + (3,)), model,
                                           false_positive_rate=rate, levels=LEVELS)["umn_damage"]
    # Binomial: 3 SD above the rate. The Gumbel law is fitted on 80 held-out maxima (with
    # 40 the rate came out at 6.7 %: the fit's own error), so it is a bound, not a match.
    assert found / draws <= rate + 3 * np.sqrt(rate * (1 - rate) / draws)


@pytest.mark.parametrize("flip", [False, True])
def test_focal_lesion_found_on_its_side_at_its_voxel(flip):
    rng = np.random.default_rng(2)
    base, volume, white_matter = synthetic_volume()
    model = fitted_model(rng, base, volume, white_matter)
    scan = healthy_scan(rng, base, 0.03 * rng.standard_normal(SHAPE), 0.05)
    lesion = (6, 7, 26)  # inside the left CST column
    scan[5:8, 6:9, 25:28] *= 0.45
    coords = np.moveaxis(np.indices(SHAPE, dtype=float), 0, -1) + 100.0  # 'subject' mm
    if flip:  # the same lesion in the right hemisphere
        scan = scan[::-1]
        lesion = (SHAPE[0] - 1 - lesion[0],) + lesion[1:]
    result = mirrored.mirrored_finding(scan, coords, model, false_positive_rate=0.01,
                                       levels=LEVELS)
    assert result["umn_damage"] and result["value"] > result["threshold"]
    assert result["affected_side"] == ("right" if flip else "left")
    assert result["level"] == "internal_capsule"
    peak = np.linalg.inv(AFFINE) @ np.r_[result["peak_mni_mm"], 1]
    assert np.abs(peak[:3] - lesion).max() <= 1
    assert np.allclose(result["peak_ras_mm"], coords[tuple(np.rint(peak[:3]).astype(int))])
    assert result["p_value"] < 0.01


def test_bundled_model_is_on_the_template_grid_with_its_provenance():
    model = mirrored.load_model()
    template = nib.load(atlases.template_fa_path())
    assert np.allclose(model["affine"], template.affine)
    assert model["cst_volume"].shape == template.shape
    # Left half only, and every CST-volume voxel has a positive healthy SD.
    x = nib.affines.apply_affine(template.affine, np.argwhere(model["cst_volume"]))[:, 0]
    assert (x < 0).all() and 300 < model["cst_volume"].sum() < 3000
    assert (model["sd_ai"][model["cst_volume"]] > 0).all()
    assert not (model["white_matter"] & model["cst_volume"]).any()
    assert model["gumbel_scale"] > 0 and "tune" in model["source"]


def test_no_statement_when_the_hemispheres_do_not_correspond():
    """A 'brain' whose right CST lies elsewhere than its left one's mirror image (as a
    phantom's may after registration): no finding either way, and the reason."""
    rng = np.random.default_rng(3)
    base, volume, white_matter = synthetic_volume()
    model = fitted_model(rng, base, volume, white_matter)
    scan = healthy_scan(rng, base, 0.03 * rng.standard_normal(SHAPE), 0.05)
    scan[13:16] = np.roll(scan[13:16], 2, axis=1)  # the right column, 4 mm further back
    result = mirrored.mirrored_finding(scan, np.zeros(SHAPE + (3,)), model,
                                       false_positive_rate=0.01, levels=LEVELS)
    assert result["umn_damage"] is None and "do not correspond" in result["not_applicable"]
    assert result["z_spread"] > model["z_spread_limit"]
