"""Mirrored FA asymmetry inside the CST volume: a focal lesion, wherever it lies.

The tract profile averages FA over the bundle and along a few nodes, and tracking
itself may steer around a lesion whose FA falls below the stopping threshold, so a
focal lesion can leave a profile nearly unchanged. This rule does not depend on the
streamlines: in template space (the scan's FA warped by the atlas registration),
every voxel of the CST volume is compared with its mirror image across the
template's midline,

    AI(v) = (FA(v) - FA(v')) / (FA(v) + FA(v'))     (v' = v with x -> -x),

in the spirit of differential tractography (Yeh et al. 2019, NeuroImage 188:186),
with the other hemisphere standing in for the earlier scan.

Healthy asymmetry is taken out voxel by voxel: a model learned from healthy real runs
(``scripts/fit_mirrored_asymmetry.py``) gives, at each voxel of the left half of
the CST volume, the mean AI (the template's own asymmetry and what registration
does systematically) and its SD between scans. Each scan is calibrated to itself:
the spread of its mirrored AI in the white matter outside the CST volume (noise,
resolution and registration quality of this very scan) scales the SDs. The z-map
is averaged over a box about the size of a small lesion, and the largest |mean z|
is the statistic; its healthy distribution (largest |mean z| of healthy scans, each
judged by a model fitted without that volunteer) is a Gumbel law, which gives the
threshold for a stated false-positive rate and each scan's p-value.

Negative z: FA lower on the voxel's side than on its mirror, so the side of a
finding is the hemisphere of its peak (template x < 0: left).
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

import atlases

#: The model: a NIfTI on the template grid with volumes ``MODEL_VOLUMES``, and a JSON
#: sidecar with its scalars and provenance.
MODEL_FILE = atlases.mirrored_ai_model_path()
MODEL_VOLUMES = ("cst_volume", "mean_ai", "sd_ai", "white_matter")

#: Side of the box (template voxels, 2 mm) over which z is averaged: about a 6 mm lesion.
BOX_VOXELS = 3

#: Voxels this close to the edge of the scan's warped FA (partial volume with the
#: background) are left out, and so are their mirror images.
EDGE_EROSION_VOXELS = 1


def mirror_x(image):
    """``image`` (template grid, x first) mirrored across the template's midline."""
    return np.asarray(image)[::-1]


def check_midline(template_affine, shape):
    """Raise unless world x = 0 lies at the centre of the template's first axis, with
    that axis along x: then :func:`mirror_x` maps x to -x exactly."""
    affine = np.asarray(template_affine, dtype=float)
    centre_x = affine[0, 0] * (shape[0] - 1) / 2 + affine[0, 3]
    if not (np.allclose(affine[1:3, 0], 0) and np.allclose(affine[0, 1:3], 0)
            and abs(centre_x) < 1e-6):
        raise ValueError("the template grid is not mirror-symmetric about x = 0")


def mirrored_ai(fa_template):
    """Voxel-wise AI of the FA against its mirror image, NaN where either side lies
    outside the scan's warped FA (eroded by :data:`EDGE_EROSION_VOXELS`)."""
    fa = np.asarray(fa_template, dtype=float)
    valid = ndimage.binary_erosion(fa > 0, iterations=EDGE_EROSION_VOXELS)
    valid &= mirror_x(valid)
    mirrored = mirror_x(fa)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, (fa - mirrored) / (fa + mirrored), np.nan)


def robust_sd(values):
    """1.4826 × the median absolute deviation of the finite ``values`` (the SD of a
    normal sample, unmoved by a few outliers such as a lesion's voxels)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def scan_scale(ai, white_matter):
    """:func:`robust_sd` of the mirrored AI in ``white_matter`` (bool): how far this
    scan's two hemispheres differ where no lesion is looked for (NaN with under 100
    voxels to judge it by)."""
    values = ai[white_matter]
    return robust_sd(values) if np.isfinite(values).sum() >= 100 else np.nan


def scan_sd(model, scale):
    """The healthy SD of the AI at each voxel, for a scan of this ``scale``."""
    return model["sd_ai"] * (scale / model["reference_scale"])


def local_mean(values, inside, box_voxels):
    """Mean of ``values`` over a box of ``box_voxels`` per side around every voxel,
    counting only finite values inside ``inside``; NaN where under half the box is."""
    weight = (inside & np.isfinite(values)).astype(float)
    total = ndimage.uniform_filter(np.where(weight > 0, values, 0.0), box_voxels,
                                   mode="constant")
    count = ndimage.uniform_filter(weight, box_voxels, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inside & (count > 0.5), total / count, np.nan)


def z_map(ai, model, scale):
    """Local mean z of the left half of the CST volume (template grid, NaN elsewhere):
    (AI − healthy mean) / (healthy SD × this scan's scale / the healthy runs' scale)."""
    volume = model["cst_volume"]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(volume, (ai - model["mean_ai"]) / scan_sd(model, scale), np.nan)
    return local_mean(z, volume, model["box_voxels"])


def detectable_fa_drop(z, model, scale, threshold, levels):
    """Per level, the smallest relative drop of one side's FA, over a whole box, that
    reaches ``threshold``: |AI| = threshold × the median SD of the level's voxels this
    scan could judge (``z`` finite), and a drop d gives |AI| = d / (2 − d). Levels
    with no such voxel are left out: a negative result excludes nothing there."""
    label_array, names = levels
    sd = scan_sd(model, scale)
    judged = np.isfinite(z)
    drops = {}
    for label, name in names.items():
        at_level = judged & (label_array == label)
        if at_level.any():
            x = threshold * float(np.median(sd[at_level]))
            drops[name] = round(2 * x / (1 + x), 3)
    return drops


def z_spread(z):
    """:func:`robust_sd` of the local mean z over the CST volume.

    Near 0.5 on healthy brains and hardly raised by a focal lesion (a few percent of
    the volume); large where registration did not bring the two hemispheres into
    correspondence (an abnormal brain, a phantom), where the test does not apply.
    """
    return robust_sd(z)


def gumbel_survival(x, loc, scale):
    """P(X ≥ x) for a Gumbel (maximum) law."""
    return float(-np.expm1(-np.exp(-(x - loc) / scale)))


def gumbel_quantile(p, loc, scale):
    """x with P(X < x) = p for a Gumbel (maximum) law."""
    return float(loc - scale * np.log(-np.log(p)))


def _sidecar(path):
    return Path(str(path).replace(".nii.gz", ".json"))


def load_model_summary(path=MODEL_FILE):
    """The model's scalars and provenance (its JSON sidecar, less the list of runs):
    what a run records of the model, without reading its arrays."""
    summary = json.loads(_sidecar(path).read_text())
    summary.pop("runs", None)
    return summary


def load_model(path=MODEL_FILE):
    """The model: arrays of :data:`MODEL_VOLUMES` (``cst_volume``, ``white_matter``
    bool) on the template grid, its ``affine``, and the sidecar's scalars."""
    path = Path(path)
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    model = load_model_summary(path)
    model.update({name: data[..., k] for k, name in enumerate(MODEL_VOLUMES)})
    model["cst_volume"] = model["cst_volume"] > 0.5
    model["white_matter"] = model["white_matter"] > 0.5
    model["affine"] = image.affine
    return model


def mirrored_finding(fa_template, subject_coords, model, *, false_positive_rate, levels):
    """The mirrored-asymmetry rule on one scan.

    Parameters
    ----------
    fa_template : (X, Y, Z) the scan's FA warped to the template grid
    subject_coords : (X, Y, Z, 3) the scan's world RAS position (mm) of every template
        voxel (``register_atlas``), to report the peak where the scan has it
    model : :func:`load_model`
    false_positive_rate : float
        The rate of findings on healthy scans the threshold allows.
    levels : (X, Y, Z) int level labels on the template grid, and its ``names``
        (``atlases.LEVEL_LABELS``) as ``(array, {label: name})``

    Returns
    -------
    dict: ``name``, ``value`` (largest |local mean z|), ``threshold``, ``p_value``,
    ``false_positive_rate``, ``scan_scale``, ``z_spread`` (:func:`z_spread`),
    ``umn_damage``, ``detectable_fa_drop`` (:func:`detectable_fa_drop`) and, when found,
    ``affected_side``, ``level``, ``peak_mni_mm`` and ``peak_ras_mm``. When ``z_spread``
    exceeds the model's ``z_spread_limit``, ``umn_damage`` is None and
    ``not_applicable`` says why.
    """
    check_midline(model["affine"], np.shape(fa_template))
    ai = mirrored_ai(fa_template)
    scale = scan_scale(ai, model["white_matter"])
    threshold = gumbel_quantile(1.0 - false_positive_rate, model["gumbel_loc"],
                                model["gumbel_scale"])
    result = {"name": "largest |local mean z| of the mirrored FA asymmetry in the CST volume",
              "value": None, "threshold": round(threshold, 3), "p_value": None,
              "false_positive_rate": false_positive_rate,
              "scan_scale": None if not np.isfinite(scale) else round(scale, 4),
              "umn_damage": False}
    z = z_map(ai, model, scale) if np.isfinite(scale) else np.full(np.shape(ai), np.nan)
    if not np.isfinite(z).any():
        return result
    spread = z_spread(z)
    result["z_spread"] = round(spread, 3)
    if spread > model["z_spread_limit"]:
        # No statement either way: the mirror image of a voxel is not its homologue here.
        result.update(umn_damage=None, not_applicable=(
            f"the two hemispheres do not correspond after registration (spread of z over "
            f"the CST volume {spread:.2f} > {model['z_spread_limit']:.2f})"))
        return result
    result["detectable_fa_drop"] = detectable_fa_drop(z, model, scale, threshold, levels)
    peak = np.unravel_index(np.nanargmax(np.abs(z)), z.shape)
    value = float(abs(z[peak]))
    result.update(value=round(value, 3), p_value=round(gumbel_survival(
        value, model["gumbel_loc"], model["gumbel_scale"]), 5))
    if value < threshold:
        return result
    # z < 0: the voxel (left half) has the lower FA; z > 0: its mirror (right half) has.
    voxel = peak if z[peak] < 0 else (np.shape(z)[0] - 1 - peak[0],) + tuple(peak[1:])
    label_array, names = levels
    result.update(
        umn_damage=True, affected_side="left" if z[peak] < 0 else "right",
        level=names.get(int(label_array[voxel])),
        peak_mni_mm=[round(float(v), 1) for v in nib.affines.apply_affine(
            model["affine"], voxel)],
        peak_ras_mm=[round(float(v), 1) for v in np.asarray(subject_coords)[voxel]])
    return result


# ---------------------------------------------------------------- fitting the model

def fit_healthy(ai_maps, scales, volume):
    """Healthy mean and SD of the mirrored AI at each voxel of ``volume``.

    Parameters
    ----------
    ai_maps : (n_runs, X, Y, Z) :func:`mirrored_ai` of healthy runs
    scales : (n_runs,) their :func:`scan_scale`
    volume : (X, Y, Z) bool, the left half of the CST volume

    Returns
    -------
    mean_ai, sd_ai : (X, Y, Z), zero outside ``volume``; the SD is of each run's
        deviation from the mean rescaled to the runs' mean scale, and is floored at
        its median over the volume (a voxel where a few runs happen to agree still
        varies between people)
    reference_scale : float, the runs' mean scale
    """
    scales = np.asarray(scales, dtype=float)
    values = np.asarray(ai_maps, dtype=float)[:, volume]
    seen = np.isfinite(values)
    count = seen.sum(axis=0)
    mean = np.where(seen, values, 0).sum(axis=0) / np.maximum(count, 1)
    reference = float(scales.mean())
    deviations = np.where(seen, (values - mean) * (reference / scales)[:, None], 0)
    # A voxel seen in fewer than two runs (outside most fields of view) takes the floor.
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt((deviations ** 2).sum(axis=0) / (count - 1))
    floor = np.median(sd[count > 1])
    sd = np.maximum(np.where(count > 1, sd, floor), floor)
    mean_map, sd_map = np.zeros(volume.shape), np.zeros(volume.shape)
    mean_map[volume] = mean
    sd_map[volume] = sd
    return mean_map, sd_map, reference


def held_out_maxima(ai_maps, scales, volume, volunteers, box_voxels):
    """Largest |local mean z| of every run, judged by a model fitted without its
    volunteer: the statistic's healthy distribution as a new person would meet it."""
    ai_maps, scales, volunteers = (np.asarray(ai_maps, dtype=float), np.asarray(scales),
                                   np.asarray(volunteers))
    maxima = np.full(len(ai_maps), np.nan)
    for volunteer in np.unique(volunteers):
        held_out = volunteers == volunteer
        mean, sd, reference = fit_healthy(ai_maps[~held_out], scales[~held_out], volume)
        model = {"cst_volume": volume, "mean_ai": mean, "sd_ai": sd,
                 "reference_scale": reference, "box_voxels": box_voxels}
        for k in np.flatnonzero(held_out):
            maxima[k] = np.nanmax(np.abs(z_map(ai_maps[k], model, scales[k])))
    return maxima


def fit_gumbel(maxima):
    """Location and scale of the Gumbel law fitted to ``maxima`` (maximum likelihood)."""
    from scipy.stats import gumbel_r  # slow to import, and only fitting needs it

    loc, scale = gumbel_r.fit(np.asarray(maxima, dtype=float))
    return float(loc), float(scale)


#: The test's validity limit on the spread of z: this many times the widest healthy run's.
Z_SPREAD_FACTOR = 2.0


def fit_model(ai_maps, scales, volume, white_matter, volunteers, affine):
    """The whole model from healthy runs: :func:`fit_healthy`, the Gumbel law of
    :func:`held_out_maxima`, and the validity limit on :func:`z_spread` (twice the
    widest healthy run's: a focal lesion adds little, a phantom or a grossly abnormal
    brain more). Returns the dict :func:`load_model` gives, with ``held_out_maxima``
    and ``healthy_z_spread`` (their arrays) besides."""
    maxima = held_out_maxima(ai_maps, scales, volume, volunteers, BOX_VOXELS)
    loc, scale = fit_gumbel(maxima)
    mean, sd, reference = fit_healthy(ai_maps, scales, volume)
    model = {"cst_volume": volume, "mean_ai": mean, "sd_ai": sd, "white_matter": white_matter,
             "reference_scale": reference, "box_voxels": BOX_VOXELS, "affine": affine,
             "gumbel_loc": loc, "gumbel_scale": scale, "held_out_maxima": maxima}
    spreads = np.array([z_spread(z_map(ai, model, s)) for ai, s in zip(ai_maps, scales)])
    model.update(z_spread_limit=Z_SPREAD_FACTOR * float(spreads.max()),
                 healthy_z_spread=spreads)
    return model
