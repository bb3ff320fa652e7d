"""The HTML report: self-contained, correct orientation, robust to missing inputs."""

import base64
import csv
import io
import os
import re
import tempfile

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from pipeline import report
from pipeline.io.profiles_table import read_profiles_tsv
from pipeline.report import drawing, prose, values
from pipeline.report.figures_anatomy import color_fa_slice

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
LEVELS = (["medulla"] * 10 + ["pons"] * 15 + ["cerebral_peduncle"] * 15
          + ["internal_capsule"] * 20 + ["corona_radiata"] * 25 + ["cortex"] * 15)

# LAS storage: voxel i grows towards the subject's left (world x decreases).
SHAPE = (40, 48, 44)
LAS_AFFINE = np.array([[-2.0, 0, 0, 39.0],
                       [0, 2.0, 0, -47.0],
                       [0, 0, 2.0, -43.0],
                       [0, 0, 0, 1]])


def _world_grid(affine, shape):
    ijk = np.indices(shape).reshape(3, -1).T
    return nib.affines.apply_affine(affine, ijk).reshape(shape + (3,))


def _fa_data(affine, shape):
    """Brain-like ellipsoid (FA 0.25) with a bright column (FA 0.9) at world x = -20 only."""
    xyz = _world_grid(affine, shape)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    fa = np.where((x / 36) ** 2 + (y / 44) ** 2 + (z / 40) ** 2 < 1, 0.25, 0.0)
    fa[(np.hypot(x + 20, y) < 5) & (np.abs(z) < 35)] = 0.9
    return fa.astype(np.float32)


def _tract(x0, n=40, seed=0):
    rng = np.random.default_rng(seed)
    z = np.linspace(-30, 30, 61)
    out = []
    for _ in range(n):
        dx, dy = rng.normal(0, 1.0, 2)
        out.append(np.stack([np.full_like(z, x0 + dx), np.full_like(z, dy), z], 1)
                   .astype(np.float32))
    return out


def _save_trk(path, streamlines, affine, shape):
    tractogram = nib.streamlines.Tractogram(streamlines, affine_to_rasmm=np.eye(4))
    header = {nib.streamlines.Field.VOXEL_TO_RASMM: affine,
              nib.streamlines.Field.VOXEL_SIZES: (2.0, 2.0, 2.0),
              nib.streamlines.Field.DIMENSIONS: shape,
              nib.streamlines.Field.VOXEL_ORDER: "".join(nib.aff2axcodes(affine))}
    nib.streamlines.save(tractogram, str(path), header=header)
    return path


HEALTHY_MODEL = {"source": "provisional, to be refitted by scripts/fit_healthy_asymmetry.py",
                 "sd_by_level": {"pons": 0.04, "internal_capsule": 0.04}, "sd_default": 0.04,
                 "node_correlation": 0.95}
CALIBRATED = {"method": "calibrated", "false_positive_rate": 0.01, "window_nodes": [6, 12],
              "null_draws": 2000, "node_ai": 0.1, "min_nodes": 6, "segment_mean_ai": 0.2,
              "end_nodes": 10, "tract_ai": 0.05, "healthy_model": HEALTHY_MODEL}


def _metrics():
    """Metrics of a run with the calibrated rule (the default) and a finding."""
    ai = [0.0] * 100
    for i in range(50, 60):
        ai[i] = -0.15
    return {
        "subject": "philips01", "entities": {"dir": "AP"},
        "cst": {s: {"n_streamlines": 40, "fa_mean": 0.5, "md_mean": 7e-4, "rd_mean": 5e-4,
                    "ad_mean": 1.2e-3, "length_mm_mean": 60.0} for s in ("left", "right")},
        "asymmetry": {"fa_ai_tract": -0.02, "fa_ai_plic": -0.14, "fa_ai_profile": ai,
                      "fa_ai_profile_se": [0.02] * 50 + [0.03] * 50,
                      "fa_profile_se": {"left": [0.015] * 100, "right": [0.015] * 100}},
        "localization": {
            "assessable": True, "umn_damage": True, "affected_side": "left",
            "level": "internal_capsule", "peak_ras_mm": [-20.0, 0.0, 8.0], "peak_node": 55,
            "confidence": "high",
            "segments": [{"side": "left", "start_node": 50, "end_node": 59, "peak_node": 55,
                          "peak_level": "internal_capsule", "peak_ras_mm": [-20.0, 0.0, 8.0],
                          "peak_ai": -0.15, "mean_ai": -0.15, "start_level": "internal_capsule",
                          "end_level": "internal_capsule", "summed_abs_ai": 1.5,
                          "peak_t": -5.12}],
            "thresholds": dict(CALIBRATED),
            "statistic": {"name": "largest |window mean AI / SE|", "value": 5.123,
                          "threshold": 3.5, "p_value": 0.0005, "false_positive_rate": 0.01,
                          "healthy_model": HEALTHY_MODEL["source"]},
            "detectable_fa_drop": {"pons": 0.277, "cerebral_peduncle": 0.257,
                                   "internal_capsule": 0.241, "corona_radiata": 0.252},
            "levels_near_boundary": None},
        "prognosis": {"category": "umn_damage_plic_asymmetry_below_prep_cutoff",
                      "summary": "UMN damage <b>shows</b> along the left CST.",
                      "rationale": ["Reduced FA along the left CST."],
                      "references": ["Stinear CM et al. Brain 2012;135:2527–2535."],
                      "disclaimer": "Research use only."},
        "qc": {"assessable": True, "warnings": ["Low SNR in the pons <check>"],
               "notices": ["The gradient table was corrected (flip x): fibre coherence 21.0 -> "
                           "35.0 mm mean streamline length. Check the b-vectors of this scan."],
               "noise": {"method": "mppca", "noise_sigma_median": 12.5, "snr_b0": 23.4,
                         "brain_mask_ml": 1400.0},
               "motion": {"model": "affine", "translation_mm": [[0, 0, 0], [0.2, -0.1, 0.4],
                                                                [1.5, 0.3, -0.2]],
                          "rotation_deg": [[0, 0, 0], [0.1, 0.0, -0.2], [0.8, -0.3, 0.1]],
                          "framewise_displacement_mm": [0.0, 0.6, 2.9],
                          "max_translation_mm": 1.5, "max_rotation_deg": 0.8,
                          "mean_framewise_displacement_mm": 1.17},
               "outliers": {"volumes": [2], "reasons": {"2": "signal dropout in 5 slices"},
                            "excluded": [2]},
               "gradient_check": {"status": "corrected", "correction": "flip x",
                                  "score_before": 21.0, "score_after": 35.0,
                                  "candidates": {"as given": 21.0, "flip x": 35.0,
                                                 "flip y": 20.0, "swap x-y": 12.0}},
               "limits": {"min_streamlines": 20, "min_roi_coverage": 0.6,
                          "min_brainstem_coverage": 0.9, "min_template_correlation": 0.4},
               "registration": {"template_fa_correlation": 0.81,
                                "roi_coverage": {"plic_L": 1.0, "plic_R": 0.95,
                                                 "pons_L": 0.4, "pons_R": 0.7}},
               "preprocessing": {"tensor": {"model": "tensor (WLS)", "shells": [1000.0],
                                            "n_volumes": 32, "excluded_volumes": [2]}},
               "tracking": {"n_seeds": 8760, "n_streamlines_tracked": 5796,
                            "inferior_landmark": "pons", "profile_start_mni_z": -31.71,
                            "landmark_streamlines": {"medulla": {"left": 323, "right": 11},
                                                     "pons": {"left": 800, "right": 740},
                                                     "peduncle": {"left": 1381,
                                                                  "right": 1107}},
                            "model_choice": {"model": "dti", "requested": "dti"},
                            "sides": {"left": {"selected": 2019, "clipped": 2001,
                                               "cleaned": 1876},
                                      "right": {"selected": 2337, "clipped": 2300,
                                                "cleaned": 12}}}},
        "provenance": {"software": {"dipy": "1.12.0", "numpy": "2.1.0"},
                       "parameters": {
                           "seed": 7, "thresholds": {"node_ai": 0.1},
                           "preprocessing": {"b0_threshold": 50.0, "denoise": "mppca",
                                             "brain_mask": "median_otsu(median_radius=2)",
                                             "tensor_fit": "WLS", "gibbs": True,
                                             "motion": "affine", "outliers": "exclude",
                                             "gradient_check": "fix",
                                             "dti_max_bvalue": 1500.0},
                           "tracking": {"model": "dti", "direction": "prob",
                                        "fa_stop": 0.2, "gap_fa": 0.1,
                                        "corridor_radius_mm": 8.0, "max_angle_deg": 45.0,
                                        "step_mm": 0.5, "seeds_per_voxel": 10,
                                        "min_coverage": 0.6},
                           "localization": dict(CALIBRATED),
                           "prognosis": {"prep_plic_ai": 0.25},
                           "qc": {"min_streamlines": 20, "min_roi_coverage": 0.6,
                                  "min_brainstem_coverage": 0.9,
                                  "min_template_correlation": 0.4}},
                       "inputs": {"dwi.nii.gz": {"path": "/data/dwi.nii.gz", "sha256": "0" * 64}},
                       "created": "2024-01-01T00:00:00+00:00"},
    }


def _fixed_ai_metrics():
    """:func:`_metrics` as a run with the fixed |AI| rule records them: no statistic, no
    detectable drop, segments without a window t."""
    metrics = _metrics()
    loc = metrics["localization"]
    fixed = {"method": "fixed-ai", "node_ai": 0.1, "min_nodes": 6, "segment_mean_ai": 0.2,
             "end_nodes": 10, "tract_ai": 0.05}
    loc.update(thresholds=fixed, statistic=None, detectable_fa_drop=None, confidence="moderate")
    del loc["segments"][0]["peak_t"]
    metrics["provenance"]["parameters"]["localization"] = dict(fixed)
    return metrics


@pytest.fixture
def inputs(tmp_path):
    fa_file = tmp_path / "fa.nii.gz"
    nib.save(nib.Nifti1Image(_fa_data(LAS_AFFINE, SHAPE), LAS_AFFINE), str(fa_file))
    mask_file = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((_fa_data(LAS_AFFINE, SHAPE) > 0).astype(np.uint8), LAS_AFFINE),
             str(mask_file))
    xyz = _world_grid(LAS_AFFINE, SHAPE)
    rois = np.zeros(SHAPE, np.int16)
    for label, (x0, z0) in {3: (-20, 8), 4: (20, 8), 5: (-15, -12), 6: (15, -12)}.items():
        rois[(np.hypot(xyz[..., 0] - x0, xyz[..., 1]) < 4) & (np.abs(xyz[..., 2] - z0) < 3)] = label
    rois_file = tmp_path / "rois.nii.gz"
    nib.save(nib.Nifti1Image(rois, LAS_AFFINE), str(rois_file))
    left = _save_trk(tmp_path / "cst_L.trk", _tract(-20, seed=1), LAS_AFFINE, SHAPE)
    right = _save_trk(tmp_path / "cst_R.trk", _tract(20, seed=2), LAS_AFFINE, SHAPE)
    # Principal eigenvector in the voxel frame: voxel axis 0 (world -x in LAS) in the
    # background, voxel axis 2 (world z) in the bright column.
    v1 = np.zeros(SHAPE + (3,), np.float32)
    v1[..., 0] = 1.0
    column = _fa_data(LAS_AFFINE, SHAPE) > 0.5
    v1[column] = (0.0, 0.0, 1.0)
    v1_file = tmp_path / "v1.nii.gz"
    nib.save(nib.Nifti1Image(v1, LAS_AFFINE), str(v1_file))
    # Template brain mask "warped to the subject": a slightly shrunken ellipsoid.
    x, y, z = np.moveaxis(xyz, -1, 0)
    template = ((x / 34) ** 2 + (y / 42) ** 2 + (z / 38) ** 2 < 1).astype(np.uint8)
    template_file = tmp_path / "template_in_subject.nii.gz"
    nib.save(nib.Nifti1Image(template, LAS_AFFINE), str(template_file))
    tsv = tmp_path / "profiles.tsv"
    with open(tsv, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["tract", "node", "fa", "md", "rd", "ad", "x", "y", "z", "level"])
        for tract, x0 in (("CST_L", -20), ("CST_R", 20)):
            for node in range(100):
                fa = 0.55 - (0.15 if tract == "CST_L" and 50 <= node < 60 else 0.0)
                writer.writerow([tract, node, fa, 7e-4, 5e-4, 1.2e-3, x0, 0.0,
                                 -30 + 0.6 * node, LEVELS[node]])
    return {"fa_file": fa_file, "mask_file": mask_file, "rois_file": rois_file,
            "tract_files": {"left": left, "right": right}, "profiles_tsv": tsv,
            "v1_file": v1_file, "template_in_subject_file": template_file}


def _images(text):
    images = []
    for payload in IMG_RE.findall(text):
        raw = base64.b64decode(payload, validate=True)
        assert raw.startswith(PNG_SIGNATURE)
        pixels = imread(io.BytesIO(raw), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
        images.append(pixels)
    return images


def _assert_self_contained(text):
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?\s*([^"\'\s>]+)', text, flags=re.I)
    assert refs
    assert not [r for r in refs if re.match(r"(https?:)?//", r, flags=re.I)]
    assert "<script" not in text.lower()
    assert "@import" not in text and "url(" not in text


def test_full_report(inputs, tmp_path):
    out = tmp_path / "out" / "sub-philips01_dir-AP_report.html"
    path = report.write_report(out, metrics=_metrics(), **inputs)
    assert path == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left
    text = out.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<!DOCTYPE html>")
    assert "sub-philips01_dir-AP" in text
    assert "Research use only — not a medical device" in text
    assert "UMN) damage shown: yes" in text
    # The verdict states the calibrated test: statistic, threshold, rate, p, confidence.
    assert ("Reduced FA along the left CST at the internal capsule "
            "(peak at x=-20, y=0, z=8 mm RAS): the largest window asymmetry was |t| = 5.1 "
            "against a threshold of 3.5 (calibrated to a 1 % chance of a finding on a healthy "
            "scan of this quality; p &lt; 0.001), confidence high. A lesion of the left CST "
            "would affect the right side of the body.") in text
    assert "<th>Window t</th>" in text and "<td>-5.12</td>" in text
    # Order: banner, verdict, prognosis, figures, QC, methods.
    order = [text.index(s) for s in ('class="banner"', 'id="verdict"', 'id="prognosis"',
                                     'id="figures"', 'id="qc"', 'id="methods"')]
    assert order == sorted(order)
    # Strings from the metrics are escaped.
    assert "&lt;b&gt;shows&lt;/b&gt;" in text and "<b>shows</b>" not in text
    assert "Low SNR in the pons &lt;check&gt;" in text
    # Generic QC and provenance tables; citations.
    assert "registration.roi_coverage.plic_L" in text
    assert "thresholds.node_ai" in text and "0" * 64 in text
    for cite in ("Garyfallidis", "Veraart", "Avants", "Yeatman", "Stinear"):
        assert cite in text
    # New figures: colour FA, glass brain, registration.
    for alt in ("Colour FA with CST outlines", "Glass-brain projection of the CSTs",
                "Registration QC", "Motion parameters", "Gradient-table check"):
        assert f'alt="{alt}"' in text
    # Readable registration and tracking QC, low values flagged.
    qc = text[text.index('id="qc"'):text.index('id="methods"')]
    assert "FA correlation with the MNI template" in qc and "0.81" in qc
    assert "Posterior limb of the internal capsule" in qc and "95 %" in qc
    assert '<td class="num bad">40 % ⚠</td>' in qc  # pons_L below the 60 % limit
    assert "8760" in qc and "5796" in qc
    # Tracking facts: the landmark, where the profiles start, the streamlines per landmark.
    assert "<b>Inferior landmark:</b> pons" in qc
    assert "<b>Profiles start at (both sides):</b> MNI z = -31.7 mm" in qc
    assert ("medulla 323 / 11; pons 800 / 740; cerebral peduncle 1381 / 1107") in qc
    # What a negative result excludes: per level, the smallest detectable drop, or a dash.
    table = qc[qc.index('<h3 id="sensitivity">'):]
    table = table[:table.index("</table>")]
    assert "What a negative result excludes" in table
    assert "at the calibrated threshold |t| = 3.5 (a 1 % chance" in table
    assert "over a window of 6 nodes, about 4 mm of this tract" in table  # 6 × 60 mm / 99
    assert "focal lesion that affects only part of the tract" in table
    assert re.findall(r"<tr><th>([a-z ]+)</th><td[^>]*>([^<]+)</td></tr>", table) == [
        ("medulla", "—"), ("pons", "28 %"), ("cerebral peduncle", "26 %"),
        ("internal capsule", "24 %"), ("corona radiata", "25 %"), ("cortex", "—")]
    # The per-node lists are drawn, not listed in the asymmetry table.
    assert "fa_ai_profile_se" not in qc and "fa_profile_se" not in qc
    # Preprocessing QC: noise, motion, outliers and the gradient check, stated in words.
    assert "23.4" in qc and "2 (signal dropout in 5 slices)" in qc
    assert "flip x" in qc and "21 → 35" in qc
    verdict_box = text[text.index('id="verdict"'):text.index('id="prognosis"')]
    assert "gradient table was corrected (flip x)" in verdict_box
    assert '<td class="num bad">12 ⚠</td>' in qc  # right CST below 20 streamlines
    assert '<td class="num">1876</td>' in qc
    # Methods paragraph generated from the recorded parameters.
    methods = text[text.index('<p class="methods">'):]
    methods = methods[:methods.index("</p>")]
    for phrase in ("MP-PCA", "b ≤ 50 s/mm²", "fitted by WLS with DIPY 1.12.0", "random seed 7",
                   "Gibbs ringing", "b-vector was rotated", "left out of the tensor fit",
                   "24 signed axis permutations",
                   "b = 0 volumes and the b = 1000 s/mm² shell (32 volumes)",
                   "10 seeds per voxel", "step of 0.5 mm", "FA &lt; 0.2", "exceeds 45°",
                   "Deterministic tensor tractography",
                   "within 8 mm of the line through each side's CST ROIs",
                   "FA down to 0.1",
                   "lowest brainstem level (medulla, else pons, else cerebral peduncle)",
                   "(here the pons)", "here z = -31.7 mm", "named from its MNI height",
                   "at every node (none left out)", "200 bootstrap replicates",
                   "Whitcher et al. 2008", "provisional, to be refitted",
                   "every window of 6 and 12 consecutive nodes",
                   "2000 simulated healthy profiles", "exceed with probability 0.01",
                   "a 1 % chance of a false finding", "within 3 mm of the boundary",
                   "whole-tract |AI| ≥ 0.05", "cut-off of 0.25", "fewer than 20 streamlines",
                   "NumPy 2.1.0", "cst-integrity"):
        assert phrase in methods, phrase
    assert "not recorded" not in methods and "shells up to" not in methods
    assert "consecutive nodes of one sign" not in methods  # the fixed rule was not used
    assert "Whitcher B" in text  # in the references
    # Units of the diffusivities (stored in mm²/s) in the tract summary.
    assert "Mean MD (×10⁻³ mm²/s)" in qc and '<td class="num">0.7</td>' in qc
    assert "Mean RD (×10⁻³ mm²/s)" in qc and "Mean AD (×10⁻³ mm²/s)" in qc
    # A tensor run does not claim a probabilistic direction getter.
    params_table = text[text.index("<h3>Parameters</h3>"):text.index("<h3>Inputs</h3>")]
    assert "deterministic (tensor; --direction prob applies to CSD only)" in params_table
    # The asymmetry caption describes the calibrated rule: a band, no |AI| threshold.
    caption = text[text.index("<b>FA asymmetry index.</b>"):]
    caption = caption[:caption.index("</figcaption>")]
    assert "Grey band: ± 2 standard errors of AI" in caption
    assert "every window of 6 and 12 consecutive nodes" in caption
    assert "|t| = 5.1 against a threshold of 3.5" in caption
    assert "detection threshold |AI|" not in caption and "end that detection" not in caption
    images = _images(text)
    assert len(images) >= 9  # slices, colour FA, glass brain, FA, AI, MD/RD, reg., mask, ROIs
    assert "could not be drawn" not in text
    _assert_self_contained(text)


def test_write_is_atomic_and_overwrites(inputs, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old")
    report.write_report(out, metrics=_fixed_ai_metrics(), profiles_tsv=inputs["profiles_tsv"],
                        fa_file=inputs["fa_file"], tract_files=inputs["tract_files"])
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # A fixed-AI run: its threshold and end nodes in the caption, no calibrated texts.
    assert "± detection threshold |AI| = 0.1 (dashed red)" in text
    assert "the 10 nodes at each end that detection leaves out" in text
    assert "What a negative result excludes" not in text and "Grey band" not in text
    assert "<th>Window t</th>" not in text


def _colour_columns(fig, ax, rgb, tol=0.5):
    """Column indices (display pixels) of the pixels whose hue is closest to ``rgb``."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255
    target = np.array(rgb, float)
    # Remove the grey level so alpha-blended points on the grey FA still match.
    chroma = pixels - pixels.mean(axis=-1, keepdims=True)
    tchroma = target - target.mean()
    cos = (chroma @ tchroma) / (np.linalg.norm(chroma, axis=-1) * np.linalg.norm(tchroma) + 1e-9)
    strong = np.linalg.norm(chroma, axis=-1) > 0.08
    rows, cols = np.nonzero((cos > 1 - tol / 5) & strong)
    bbox = ax.get_window_extent()
    inside = (cols >= bbox.x0) & (cols <= bbox.x1)
    return cols[inside]


def test_axial_panel_neurological_left_on_left(inputs):
    from matplotlib.colors import to_rgb

    fa_img = nib.load(str(inputs["fa_file"]))
    assert nib.aff2axcodes(fa_img.affine)[0] == "L"  # stored LAS
    streamlines = {side: list(nib.streamlines.load(str(p)).streamlines)
                   for side, p in inputs["tract_files"].items()}
    fig = report.plot_tract_slices(fa_img, streamlines, center=[0.0, 0.0, 8.0],
                                   planes=("axial",))
    ax = fig.axes[0]
    left = _colour_columns(fig, ax, to_rgb(report.COLORS["left"]))
    right = _colour_columns(fig, ax, to_rgb(report.COLORS["right"]))
    assert len(left) > 20 and len(right) > 20
    midline = ax.transData.transform((0.0, 0.0))[0]
    bbox = ax.get_window_extent()
    assert abs(midline - (bbox.x0 + bbox.x1) / 2) < 0.1 * bbox.width
    assert left.max() < midline < right.min()
    # The tract points are placed at their world x (subject left = negative x = figure left).
    x_left = ax.transData.transform((-20.0, 0.0))[0]
    assert abs(np.median(left) - x_left) < 0.05 * bbox.width


def test_world_slice_independent_of_storage_orientation(inputs):
    """LAS, RAS and axis-swapped storage of the same world image give the same slice."""
    las = nib.load(str(inputs["fa_file"]))
    data = np.asarray(las.dataobj)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    ras = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), LAS_AFFINE @ flip)
    swap = np.eye(4)[[1, 0, 2, 3]]  # voxel (j, i, k) → (i, j, k)
    swapped = nib.Nifti1Image(np.ascontiguousarray(data.transpose(1, 0, 2)), LAS_AFFINE @ swap)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(swapped.affine) == ("A", "L", "S")
    extent = (-38.0, 38.0, -46.0, 46.0)
    slices = [report.sample_world_slice(img, "axial", 0.0, extent, step=2.0)
              for img in (las, ras, swapped)]
    np.testing.assert_allclose(slices[0], slices[1], atol=1e-5)
    np.testing.assert_allclose(slices[0], slices[2], atol=1e-5)
    # The bright column at world x = -20 lies in the left half (columns run from x = -38).
    column = np.argmax(slices[0].max(axis=0))
    assert -38.0 + 2.0 * column == pytest.approx(-20.0, abs=4.0)


def test_missing_tract_file(inputs, tmp_path):
    tracts = {"left": tmp_path / "does_not_exist.trk", "right": inputs["tract_files"]["right"]}
    out = report.write_report(tmp_path / "r.html", metrics=_metrics(),
                              profiles_tsv=inputs["profiles_tsv"], fa_file=inputs["fa_file"],
                              tract_files=tracts)
    text = out.read_text()
    assert "left tract file (CST_L) is missing" in text
    assert "Registration figure skipped" in text  # no template given
    assert "Colour FA not available" in text  # no V1 given
    assert len(_images(text)) >= 4
    _assert_self_contained(text)


def test_empty_tract_and_no_fa(inputs, tmp_path):
    empty = _save_trk(tmp_path / "empty.trk", [], LAS_AFFINE, SHAPE)
    metrics = _metrics()
    metrics["cst"]["right"]["n_streamlines"] = 0
    out = report.write_report(tmp_path / "r.html", metrics=metrics,
                              profiles_tsv=inputs["profiles_tsv"], fa_file=None,
                              tract_files={"left": inputs["tract_files"]["left"],
                                           "right": empty},
                              mask_file=tmp_path / "nope.nii.gz")
    text = out.read_text()
    assert "right tract (CST_R) has 0 streamlines" in text
    assert "No FA image was given" in text
    assert "brain mask file is missing" in text
    assert len(_images(text)) >= 4


def test_metrics_without_localization(inputs, tmp_path):
    metrics = _metrics()
    del metrics["localization"]
    del metrics["asymmetry"]
    del metrics["prognosis"]
    out = report.write_report(tmp_path / "r.html", metrics=metrics, **inputs)
    text = out.read_text()
    assert "damage shown: not assessable" in text
    assert "no localisation result" in text.lower()
    # The AI profile falls back on the left/right FA profiles of the TSV.
    assert len(_images(text)) >= 6
    assert "could not be drawn" not in text


def test_not_assessable_lists_qc_reasons(inputs, tmp_path):
    metrics = _metrics()
    metrics["localization"] = {"assessable": False, "umn_damage": None, "affected_side": None,
                               "level": None, "peak_ras_mm": None, "segments": [],
                               "thresholds": {"node_ai": 0.1, "min_nodes": 6}}
    metrics["qc"]["warnings"] = ["Too few left CST streamlines (3 < 20)."]
    out = report.write_report(tmp_path / "r.html", metrics=metrics, **inputs)
    text = out.read_text()
    assert "damage shown: not assessable" in text
    assert "Too few left CST streamlines (3 &lt; 20)." in text


def test_no_damage_verdict_and_minimal_metrics(tmp_path):
    metrics = {"localization": {"assessable": True, "umn_damage": False, "affected_side": "none",
                                "thresholds": {"method": "fixed-ai", "node_ai": 0.1,
                                               "min_nodes": 6}}}
    v = report.verdict(metrics)
    assert v["status"] == "no" and v["sentence"] == (
        "No imaging evidence of upper-motor-neuron damage along either CST: no segment of the "
        "FA asymmetry profile reached |AI| ≥ 0.1 over ≥ 6 consecutive nodes.")
    out = report.write_report(tmp_path / "r.html", metrics={}, profiles_tsv=None, fa_file=None,
                              tract_files={})
    text = out.read_text()
    assert "Research use only — not a medical device" in text
    assert "not assessable" in text
    _assert_self_contained(text)


def test_figure_helpers_return_figures(inputs):
    profiles = read_profiles_tsv(inputs["profiles_tsv"])
    assert set(profiles) == {"left", "right"}
    assert profiles["left"]["level"][0] == "medulla" and len(profiles["left"]["fa"]) == 100
    fig = report.plot_profiles(profiles, metric="fa",
                               segments=[{"start_node": 50, "end_node": 59}], peak_node=55)
    uri = report.figure_to_data_uri(fig)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def test_color_fa_uses_world_directions(inputs):
    """Colour FA: the voxel-frame V1 is mapped to world RAS, whatever the storage."""
    fa_img = nib.load(str(inputs["fa_file"]))
    v1_img = nib.load(str(inputs["v1_file"]))
    world = report.world_abs_directions(v1_img)
    np.testing.assert_allclose(world[0, 0, 0], [1, 0, 0], atol=1e-6)  # voxel i = world -x
    # Same world image stored with voxel axes 0 and 1 swapped: voxel axis 0 is now
    # world y (green), so a voxel-frame (1, 0, 0) must become green, not red.
    swap = np.eye(4)[[1, 0, 2, 3]]
    swapped = nib.Nifti1Image(np.ascontiguousarray(np.asarray(v1_img.dataobj)
                                                   .transpose(1, 0, 2, 3)), LAS_AFFINE @ swap)
    np.testing.assert_allclose(report.world_abs_directions(swapped)[0, 0, 0], [0, 1, 0],
                               atol=1e-6)
    fa = np.asarray(fa_img.dataobj)
    extent = (-38.0, 38.0, -46.0, 46.0)
    rgb = color_fa_slice(fa_img, fa, v1_img, world, "axial", 0.0, extent, 2.0)
    column = rgb[23, 9]  # world x = -20, y = 0: the bright column, principal direction z
    background = rgb[23, 28]  # world x = +18: FA 0.25, principal direction x
    np.testing.assert_allclose(column, [0, 0, 0.9], atol=0.05)
    np.testing.assert_allclose(background, [0.25, 0, 0], atol=0.05)
    streamlines = {side: list(nib.streamlines.load(str(p)).streamlines)
                   for side, p in inputs["tract_files"].items()}
    fig = report.plot_color_fa(fa_img, v1_img, streamlines, center=[0.0, 0.0, 8.0])
    assert len(fig.axes) == 3
    assert report.figure_to_data_uri(fig).startswith("data:image/png;base64,")


def test_glass_brain_neurological(inputs):
    from matplotlib.colors import to_rgb

    streamlines = {side: list(nib.streamlines.load(str(p)).streamlines)
                   for side, p in inputs["tract_files"].items()}
    mask_img = nib.load(str(inputs["mask_file"]))
    fig = report.plot_glass_brain(streamlines, mask_img=mask_img)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [p[2] for p in report.GLASS_PANELS]
    ax = fig.axes[titles.index("Coronal")]
    left = _colour_columns(fig, ax, to_rgb(report.COLORS["left"]))
    right = _colour_columns(fig, ax, to_rgb(report.COLORS["right"]))
    assert len(left) > 20 and len(right) > 20
    midline = ax.transData.transform((0.0, 0.0))[0]
    assert left.max() < midline < right.min()
    # Each sagittal panel shows its own tract only.
    sag_l = fig.axes[titles.index("Sagittal, CST_L")]
    assert len(_colour_columns(fig, sag_l, to_rgb(report.COLORS["right"]))) == 0
    assert len(_colour_columns(fig, sag_l, to_rgb(report.COLORS["left"]))) > 20


def test_registration_figure_mask_and_fa_template(inputs, tmp_path):
    fa_img = nib.load(str(inputs["fa_file"]))
    mask_tpl = nib.load(str(inputs["template_in_subject_file"]))
    fig = report.plot_registration(fa_img, mask_tpl, n_slices=3)
    assert len(fig.axes) == 9
    # A continuous template (FA) is outlined too.
    fig = report.plot_registration(fa_img, fa_img, n_slices=2)
    assert len(fig.axes) == 6


def test_bad_v1_is_noted(inputs, tmp_path):
    kwargs = dict(inputs, v1_file=inputs["fa_file"])  # 3D, not X×Y×Z×3
    text = report.write_report(tmp_path / "r.html", metrics=_metrics(), **kwargs).read_text()
    assert "is not an X×Y×Z×3 vector image" in text
    assert "Colour FA not available" in text
    assert "could not be drawn" not in text


def test_methods_name_the_shells_fitted_and_csd_keeps_its_direction():
    metrics = _metrics()
    metrics["qc"]["preprocessing"]["tensor"]["shells"] = [2500.0]
    text = report.methods_text(metrics)
    assert "the b = 0 volumes and the b = 2500 s/mm² shell (32 volumes)" in text
    assert "every shell lay above the 1500 s/mm² preferred for the tensor" in text
    assert "up to 1500" not in text
    metrics["qc"]["preprocessing"]["tensor"]["shells"] = [1000.0, 1500.0]
    assert "b = 1000, 1500 s/mm² shells" in report.methods_text(metrics)
    params = metrics["provenance"]["parameters"]
    metrics["qc"]["tracking"]["model_choice"] = {"model": "csd", "sh_order": 6}
    assert prose.displayed_parameters(metrics, params) is params  # CSD: as recorded
    metrics["qc"]["tracking"]["model_choice"] = {"model": "dti"}
    shown = prose.displayed_parameters(metrics, params)
    assert shown["tracking"]["direction"].startswith("deterministic (tensor")
    assert params["tracking"]["direction"] == "prob"  # the metrics are not changed


def test_qc_notices_are_shown_and_not_called_no_warnings(inputs, tmp_path):
    metrics = _metrics()
    metrics["qc"]["warnings"] = []
    metrics["qc"]["notices"] = ["Heavy head motion: largest translation from the reference "
                                "4.61 mm (notice above 2 mm)."]
    text = report.write_report(tmp_path / "r.html", metrics=metrics, **inputs).read_text()
    qc = text[text.index('id="qc"'):text.index('id="methods"')]
    assert "No QC warnings" not in qc
    assert "<h3>QC notices</h3>" in qc and "Heavy head motion" in qc
    verdict_box = text[text.index('id="verdict"'):text.index('id="prognosis"')]
    assert "QC notices" in verdict_box and "Heavy head motion" in verdict_box
    metrics["qc"]["notices"] = []
    text = report.write_report(tmp_path / "r.html", metrics=metrics, **inputs).read_text()
    assert "No QC warnings or notices." in text and "<h3>QC notices</h3>" not in text


#: The heading of the table "What a negative result excludes" (the verdict may name it too).
DROP_TABLE = '<h3 id="sensitivity">What a negative result excludes</h3>'


def _page(metrics):
    """The report of ``metrics`` alone (no image, tract or profile file)."""
    return report.build_report_html(metrics=metrics, profiles_tsv=None, fa_file=None,
                                    tract_files={})


def test_asymmetry_plot_greys_the_end_nodes_detection_ignores():
    ai = np.zeros(100)
    fig = report.plot_asymmetry_profile(ai, threshold=0.1, end_nodes=10)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "not used by detection (10 end nodes)" in labels
    spans = [p for p in ax.patches if p.get_hatch() == ".."]
    extents = sorted((round(p.get_x(), 1), round(p.get_x() + p.get_width(), 1)) for p in spans)
    assert extents == [(-0.5, 9.5), (89.5, 99.5)]
    bare = report.plot_asymmetry_profile(ai, threshold=0.1)  # not recorded: nothing greyed
    assert not [p for p in bare.axes[0].patches if p.get_hatch() == ".."]
    # What is greyed comes from the run's recorded detection settings.
    assert values.ignored_end_nodes({"end_nodes": 10}) == 10  # runs from before "method"
    assert values.ignored_end_nodes({"method": "fixed-ai", "end_nodes": 8}) == 8
    assert values.ignored_end_nodes({"method": "calibrated", "end_nodes": 10}) is None


def test_fixed_ai_rule_keeps_its_texts():
    metrics = _fixed_ai_metrics()
    assert report.verdict(metrics)["sentence"] == (
        "Reduced FA along the left CST at the internal capsule (peak at x=-20, y=0, z=8 mm "
        "RAS). A lesion of the left CST would affect the right side of the body.")
    methods = report.methods_text(metrics)
    for phrase in ("at least 6 consecutive nodes", "|AI| ≥ 0.1", "mean |AI| is at least 0.2",
                   "last 10 nodes", "whole-tract |AI| ≥ 0.05"):
        assert phrase in methods, phrase
    assert "bootstrap" not in methods and "calibrated" not in methods
    page = _page(metrics)
    (caption,) = re.findall(r'alt="FA asymmetry profile"><figcaption>(.*?)</figcaption>', page)
    assert "± detection threshold |AI| = 0.1 (dashed red); a finding needs ≥ 6" in caption
    assert "the 10 nodes at each end that detection leaves out" in caption
    assert DROP_TABLE not in page
    # Runs recorded before there was a choice of rule used the fixed one.
    del metrics["localization"]["thresholds"]["method"]
    assert values.detection_method(metrics["localization"]["thresholds"]) == "fixed-ai"
    metrics["localization"].update(umn_damage=False, affected_side="none", segments=[])
    assert "no segment of the FA asymmetry profile reached |AI| ≥ 0.1" in (
        report.verdict(metrics)["sentence"])


def test_calibrated_verdicts_name_the_test_and_a_boundary():
    metrics = _metrics()
    loc = metrics["localization"]
    loc["levels_near_boundary"] = ["cerebral_peduncle", "internal_capsule"]
    sentence = report.verdict(metrics)["sentence"]
    assert sentence.startswith("Reduced FA along the left CST at the cerebral peduncle / "
                               "internal capsule boundary (peak at x=-20, y=0, z=8 mm RAS): ")
    assert "<li><b>Level:</b> cerebral peduncle / internal capsule boundary</li>" in (
        _page(metrics))
    loc["levels_near_boundary"] = ["internal_capsule"]  # near no boundary: the level alone
    assert "at the internal capsule (peak" in report.verdict(metrics)["sentence"]
    # No finding: the statistic against its threshold, and where to read what it excludes.
    loc.update(umn_damage=False, affected_side="none", level=None, peak_ras_mm=None,
               peak_node=None, confidence=None, segments=[], levels_near_boundary=None)
    loc["statistic"].update(value=2.845, p_value=0.10195)
    assert report.verdict(metrics)["sentence"] == (
        "No imaging evidence of upper-motor-neuron damage along either CST: the largest window "
        "asymmetry was |t| = 2.8 against a threshold of 3.5 (calibrated to a 1 % chance of a "
        "finding on a healthy scan of this quality; p = 0.10). The smallest FA drop this scan "
        "could have detected at each level is listed under “What a negative result excludes”.")
    # Two decimals where one would show the statistic equal to its threshold.
    loc["statistic"].update(value=3.47, p_value=0.0063, false_positive_rate=0.005)
    assert ("|t| = 3.47 against a threshold of 3.50 (calibrated to a 0.5 % chance of a "
            "finding on a healthy scan of this quality; p = 0.006)") in (
        report.verdict(metrics)["sentence"])
    # The drop table shows whether or not there is a finding, as long as it is recorded.
    assert DROP_TABLE in _page(metrics)
    loc["detectable_fa_drop"] = None
    assert DROP_TABLE not in _page(metrics)
    assert "What a negative result" not in report.verdict(metrics)["sentence"]


def test_asymmetry_plot_draws_the_bootstrap_band_for_the_calibrated_rule():
    ai = np.zeros(100)
    ai[50:60] = -0.15
    se = np.full(100, 0.02)
    fig = report.plot_asymmetry_profile(ai, se=se, segments=[{"start_node": 50,
                                                              "end_node": 59}])
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "± 2 SE (bootstrap)" in labels and "detected segment" in labels
    assert not [label for label in labels if "threshold" in label or "end nodes" in label]
    (band,) = [c for c in ax.collections if c.get_label() == "± 2 SE (bootstrap)"]
    vertices = np.concatenate([path.vertices for path in band.get_paths()])
    assert vertices[:, 1].min() == pytest.approx(-0.19) and vertices[:, 1].max() == (
        pytest.approx(0.04))
    assert ax.get_ylim()[0] <= -0.19  # the band fits in the axes
    # The fixed rule's figure keeps its ± threshold lines and no band.
    fixed = report.plot_asymmetry_profile(ai, threshold=0.1).axes[0]
    labels = [t.get_text() for t in fixed.get_legend().get_texts()]
    assert "± threshold (0.1)" in labels and "± 2 SE (bootstrap)" not in labels


def test_methods_without_parameters():
    text = report.methods_text({})
    assert "not recorded" in text and "No run parameters are recorded" in text
    metrics = _metrics()
    metrics["provenance"]["parameters"]["preprocessing"]["denoise"] = "none"
    assert "were not denoised" in report.methods_text(metrics)


def test_figures_drawn_by_two_processes_give_the_same_page(inputs, tmp_path, monkeypatch):
    serial = report.build_report_html(metrics=_metrics(), **inputs)
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    draw = drawing.draw_figure

    def recording(spec):
        os.close(tempfile.mkstemp(dir=drawn, prefix=f"{os.getpid()}-")[0])
        return draw(spec)

    monkeypatch.setattr(drawing, "draw_figure", recording)
    parallel = report.build_report_html(metrics=_metrics(), **inputs, n_jobs=2)
    assert parallel == serial
    drawers = {p.name.split("-")[0] for p in drawn.iterdir()}
    assert len(list(drawn.iterdir())) == len(_images(parallel)) >= 8
    assert str(os.getpid()) not in drawers and len(drawers) == 2


def test_every_figure_slot_gets_an_image_or_a_placeholder(inputs, monkeypatch):
    from pipeline.report import context

    def broken(**kwargs):
        raise RuntimeError("no diffusivities")

    # A figure that fails to draw is replaced by a placeholder that says why.
    monkeypatch.setattr(context, "plot_diffusivity_profiles", broken)
    slots = context.subject_context(metrics=_metrics(), **inputs)["figures"]
    text = report.build_report_html(metrics=_metrics(), **inputs)
    assert "\x00" not in text
    images = re.findall(r"<figure><img ", text)
    placeholders = re.findall(r'<div class="placeholder">([^<]*)</div>', text)
    assert placeholders == ["Diffusivity profiles: figure could not be drawn "
                            "(RuntimeError: no diffusivities)."]
    assert len(images) + len(placeholders) == len(slots) == 11
    # Without inputs every slot says why it is empty, and nothing else is left unfilled.
    bare = context.subject_context(metrics=_metrics(), profiles_tsv=None, fa_file=None,
                                   tract_files={})["figures"]
    text = report.build_report_html(metrics=_metrics(), profiles_tsv=None, fa_file=None,
                                    tract_files={})
    drawn = [key for key, slot in bare.items() if slot["spec"] is not None]
    placeholders = re.findall(r'<div class="placeholder">([^<]*)</div>', text)
    assert len(re.findall(r"<figure><img ", text)) == len(drawn)
    assert len(placeholders) == len(bare) - len(drawn) and all(placeholders)
    assert "\x00" not in text
