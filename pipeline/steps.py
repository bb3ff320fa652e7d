"""Pipeline stages as file-in/file-out functions.

Each stage reads its inputs from files, writes its outputs into ``out_dir``
(a Nipype node's working folder when run from ``workflows``) and returns the
paths. Keeping the stages file-based is what lets Nipype cache them, resume a
killed run and ship them to other processes or cluster nodes.

Each stage names its results once (:func:`pipeline.stage.stage`); its Nipype node is
built from that and its signature (:func:`workflows.base.stage_node`), so the names of
its parameters are those of the node's inputs.
"""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine

import atlases

from . import (
    combine,
    fodf,
    gibbs,
    gradient_check,
    localization,
    motion,
    outliers,
    outputs,
    preprocess,
    prognosis,
    registration,
    tracking,
    tractometry,
    uncertainty,
)
from . import denoise as denoise_module
from .dwi import B0_THRESHOLD, load_dwi
from .errors import InputError
from .stage import stage
from .tractometry import HEMI, SIDES


def _load(path, dtype=np.float32):
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype), img


def _load_scan(dwi_file, bval_file, bvec_file, b0_threshold):
    """A pipeline intermediate (or the input) as (DwiScan, float32 data)."""
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    return scan, scan.img.get_fdata(dtype=np.float32)


def _write_bvecs(path, bvecs_fsl):
    """FSL b-vector file (three rows)."""
    with outputs.atomic_path(path) as tmp:
        np.savetxt(tmp, np.asarray(bvecs_fsl).T, fmt="%.8f")
    return path


@stage(outputs=("b0", "mask"))
def brain_mask(dwi_file, bval_file, bvec_file, *, out_dir, b0_threshold=B0_THRESHOLD):
    """Mean b0 (the reference every volume is aligned to) and the brain mask
    (:func:`pipeline.preprocess.brain_mask`, with the template's brain placed by an
    affine registration of a quick FA).

    Returns dict of paths: ``b0``, ``mask``.
    """
    out_dir = Path(out_dir)
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    b0 = preprocess.mean_b0(data, scan.b0_mask)
    dwi_mean = preprocess.mean_dwi(data, scan.b0_mask)
    mask = preprocess.brain_mask(b0, dwi_mean, scan.affine)
    # A quick FA (OLS, unprocessed) in that mask places the template's brain, which then
    # adds the brainstem that the scan's contrast may have lost.
    use, _ = preprocess.dti_volumes(scan.bvals, b0_threshold=b0_threshold)
    fa = preprocess.fit_dti(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                            b0_threshold=b0_threshold, use=use, fit_method="OLS")["fa"]
    template_fa, template_img = _load(atlases.template_fa_path())
    template_brain = registration.template_mask_in_subject(
        np.nan_to_num(fa), scan.affine, template_fa, template_img.affine,
        _load(atlases.brain_mask_path(), dtype=np.uint8)[0])
    mask = preprocess.brain_mask(b0, dwi_mean, scan.affine, template_brain=template_brain)
    return {"b0": str(outputs.save_nifti(out_dir / "b0.nii.gz", b0, scan.affine)),
            "mask": str(outputs.save_nifti(out_dir / "mask.nii.gz", mask, scan.affine,
                                           dtype=np.uint8))}


@stage(outputs=("dwi", "qc"))
def denoise(dwi_file, bval_file, bvec_file, mask_file, *, out_dir, method="mppca",
            b0_threshold=B0_THRESHOLD, n_jobs=1, mem_gb=None):
    """Thermal-noise removal (MP-PCA, Patch2Self or none).

    ``mem_gb``: the step's memory budget (None: MP-PCA's fixed default chunks). The
    series stays in memory; MP-PCA's slabs and patch batches share what is left
    (:func:`pipeline.denoise.mppca_slab_thickness`), and each denoised slab goes to the
    output file as it finishes. The result does not depend on it.

    Returns dict of paths: ``dwi`` and ``qc`` (JSON: method, noise sigma, SNR, mask volume,
    and ``header``: the input image's name and the warnings its header raised on loading,
    see :func:`pipeline.dwi.check_header`; recorded here, as denoising is the first step
    that reads the input image and writes a QC file).
    """
    out_dir = Path(out_dir)
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    measured_b0 = preprocess.mean_b0(data, scan.b0_mask)
    working_bytes = None
    if mem_gb is not None:
        working_bytes = max(int(mem_gb * 2 ** 30) - data.nbytes, 0)
    patch_radius = denoise_module.mppca_patch_radius(data.shape[-1])
    series_path = out_dir / "dwi_denoised.nii"
    with outputs.nifti_volume_writer(series_path, data.shape, scan.affine) as writer:
        _, sigma = denoise_module.denoise_dwi(data, mask, scan.bvals, method=method,
                                              patch_radius=patch_radius, n_jobs=n_jobs,
                                              memory_bytes=working_bytes, overwrite=True,
                                              write_slices=writer.slices)
    del data
    voxel_ml = float(np.prod(scan.img.header.get_zooms()[:3])) / 1000.0
    qc = {"method": method, "brain_mask_ml": round(float(mask.sum()) * voxel_ml, 1),
          "mppca_patch_radius": patch_radius if method == "mppca" else None,
          "mppca_patch_stride": denoise_module.PIPELINE_PATCH_STRIDE if method == "mppca"
          else None,
          "noise_sigma_median": None, "snr_b0": None,
          "header": {"file": Path(dwi_file).name, "warnings": list(scan.header_warnings)}}
    if sigma is not None:
        noise = float(np.median(sigma[mask]))
        qc["noise_sigma_median"] = round(noise, 3)
        if noise > 0:  # SNR of the mean b0 in the brain, with the estimated noise
            qc["snr_b0"] = round(float(np.median(measured_b0[mask])) / noise, 1)
    return {"dwi": str(series_path),
            "qc": str(outputs.write_json(out_dir / "denoise_qc.json", qc))}


@stage(outputs=("dwi",))
def remove_gibbs(dwi_file, mask_file, *, out_dir, n_jobs=1):
    """Gibbs-ringing removal in the acquisition plane (Kellner et al. 2016), in place in
    the loaded series (:func:`pipeline.gibbs.remove_gibbs_ringing`).

    Returns dict of paths: ``dwi``.
    """
    img = nib.load(str(dwi_file))
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    corrected = gibbs.remove_gibbs_ringing(img.get_fdata(dtype=np.float32), mask, n_jobs=n_jobs,
                                           overwrite=True)
    return {"dwi": str(outputs.save_nifti(Path(out_dir) / "dwi_degibbs.nii", corrected,
                                          img.affine))}


@stage(outputs=("dwi", "bval", "bvec", "mask", "denoise_qc", "qc"))
def combine_runs(dwi_files, bval_files, bvec_files, mask_files, denoise_qc_files, *, out_dir,
                 b0_threshold=B0_THRESHOLD):
    """Align the runs of one session to the first (rigid, mean b0) and concatenate them.

    Returns dict of paths: ``dwi``, ``bval``, ``bvec`` (first run's grid, FSL
    convention), ``mask`` (the first run's), ``denoise_qc`` (the runs' noise
    QC, merged) and ``qc`` (JSON: each run's rigid transform to the first).
    """
    out_dir = Path(out_dir)
    loaded, names = [], []
    for dwi, bval, bvec in zip(dwi_files, bval_files, bvec_files):
        scan, data = _load_scan(dwi, bval, bvec, b0_threshold)
        loaded.append({"data": data, "bvals": scan.bvals, "bvecs_fsl": scan.bvecs_fsl,
                       "affine": scan.affine, "b0": preprocess.mean_b0(data, scan.b0_mask)})
        names.append(Path(dwi).name)
    data, bvals, bvecs, transforms = combine.combine_runs(loaded)
    reference_img = nib.load(str(dwi_files[0]))
    qc = {"reference": 0, "n_volumes": [int(r["data"].shape[-1]) for r in loaded],
          "runs": [], "method": "rigid registration of each run's mean b0 to the first run's"}
    for transform in transforms:
        translation, rotation = combine.rigid_parameters(transform)
        qc["runs"].append({"translation_mm": np.round(translation, 3).tolist(),
                           "rotation_deg": np.round(rotation, 3).tolist()})
    noise = [json.loads(Path(f).read_text()) for f in denoise_qc_files]
    sigmas = [n["noise_sigma_median"] for n in noise if n["noise_sigma_median"] is not None]
    merged = {**noise[0], "noise_sigma_median": round(float(np.median(sigmas)), 3) if sigmas
              else None, "per_run": noise}
    with outputs.atomic_path(out_dir / "dwi_combined.bval") as tmp:
        np.savetxt(tmp, bvals[None], fmt="%g")
    return {"dwi": str(outputs.save_nifti(out_dir / "dwi_combined.nii", data,
                                          reference_img.affine)),
            "bval": str(out_dir / "dwi_combined.bval"),
            "bvec": str(_write_bvecs(out_dir / "dwi_combined.bvec", bvecs)),
            "mask": str(mask_files[0]),
            "denoise_qc": str(outputs.write_json(out_dir / "denoise_qc.json", merged)),
            "qc": str(outputs.write_json(out_dir / "combine_qc.json", qc))}


@stage(outputs=("dwi", "bvec", "qc"))
def correct_motion(dwi_file, bval_file, bvec_file, mask_file, *, out_dir, model="affine",
                   b0_threshold=B0_THRESHOLD, n_jobs=1):
    """Align every volume to the mean b0 and rotate its b-vector with it.

    The corrected series goes to its file volume by volume, never whole in memory.
    Returns dict of paths: ``dwi``, ``bvec`` (rotated, FSL convention) and
    ``qc`` (JSON: per-volume translation mm / rotation degrees in world RAS+
    axes, framewise displacement).
    """
    out_dir = Path(out_dir)
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    series_path = out_dir / "dwi_motion.nii"
    with outputs.nifti_volume_writer(series_path, data.shape, scan.affine) as writer:
        result = motion.correct_motion(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                                       b0_threshold=b0_threshold, model=model, n_jobs=n_jobs,
                                       write_volume=writer.volume)
    params = np.asarray(result.parameters)
    fd = np.asarray(result.framewise_displacement)
    qc = {"model": model, "reference": "mean b0",
          "translation_mm": np.round(params[:, :3], 3).tolist(),
          "rotation_deg": np.round(params[:, 3:], 3).tolist(),
          "framewise_displacement_mm": np.round(fd, 3).tolist(),
          "max_translation_mm": round(float(np.abs(params[:, :3]).max()), 3),
          "max_rotation_deg": round(float(np.abs(params[:, 3:]).max()), 3),
          "mean_framewise_displacement_mm": round(float(fd.mean()), 3)}
    return {"dwi": str(series_path),
            "bvec": str(_write_bvecs(out_dir / "dwi_motion.bvec", result.bvecs_fsl)),
            "qc": str(outputs.write_json(out_dir / "motion_qc.json", qc))}


@stage(outputs=("qc",))
def detect_outliers(dwi_file, bval_file, bvec_file, mask_file, motion_qc_file, *, out_dir,
                    b0_threshold=B0_THRESHOLD, action="exclude"):
    """Volumes with signal dropout or extreme motion.

    ``action`` "exclude" leaves them out of the tensor fit; "report" only lists them.
    Returns dict of paths: ``qc`` (JSON: volumes, reasons, dropped slices, excluded).
    """
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    motion_parameters = None
    if motion_qc_file:
        motion_qc = json.loads(Path(motion_qc_file).read_text())
        motion_parameters = np.hstack([motion_qc["translation_mm"], motion_qc["rotation_deg"]])
    found = outliers.detect_outlier_volumes(data, scan.bvals, mask, b0_threshold=b0_threshold,
                                            motion_parameters=motion_parameters)
    found = json.loads(json.dumps(found, default=_json_default))
    found["action"] = action
    found["excluded"] = found["volumes"] if action == "exclude" else []
    return {"qc": str(outputs.write_json(Path(out_dir) / "outliers_qc.json", found))}


@stage(outputs=("bvec", "v1", "qc"))
def check_gradients(dwi_file, bval_file, bvec_file, mask_file, outliers_file, v1_file, *,
                    out_dir, mode="fix", b0_threshold=B0_THRESHOLD, source_bvec_file=None):
    """Fibre-coherence check of the gradient table (axis flips and permutations).

    ``mode``: "fix" applies the best table and reports it, "error" stops with
    an input error naming the correction (and ``source_bvec_file``, the
    user's file), "off" skips the check.

    ``v1_file`` is the principal eigenvector of the tensor fitted with the table
    as given (:func:`fit_tensor`). A signed permutation ``M`` of the table turns
    the tensor into ``M D Mᵀ``: its eigenvalues, and so FA, MD, RD and AD, do not
    change, and its principal direction becomes ``M v1`` (voxel frame, see
    :func:`pipeline.gradient_check.correction_in_voxel_frame`). So the tensor
    maps need not wait for this check, and only ``v1`` is turned here.

    Returns dict of paths: ``bvec`` (the table to use), ``v1`` (the principal
    direction for that table) and ``qc`` (JSON, the ``qc.gradient_check`` block
    of the metrics).
    """
    out_dir = Path(out_dir)
    if mode == "off":
        qc = {"status": "skipped", "correction": None, "score_before": None,
              "score_after": None}
        return {"bvec": str(bvec_file), "v1": str(v1_file),
                "qc": str(outputs.write_json(out_dir / "gradient_check.json", qc))}
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    excluded = json.loads(Path(outliers_file).read_text())["excluded"]
    keep = np.ones(len(scan.bvals), dtype=bool)
    keep[excluded] = False
    result = gradient_check.check_gradient_table(
        data, scan.bvals, scan.bvecs_fsl, scan.affine, mask, b0_threshold=b0_threshold,
        volumes=keep)
    qc = {"status": "ok" if result.correction is None else "corrected",
          "correction": result.correction,
          "score_before": round(float(result.score_before), 3),
          "score_after": round(float(result.score_after), 3),
          "score": "mean streamline length, mm (fibre coherence; Jeurissen et al. 2014)",
          "candidates": {label: round(float(v), 3) for label, v in result.scores.items()}}
    if result.correction is not None and mode == "error":
        raise InputError(
            f"The gradient table looks wrong: '{result.correction}' makes the fibres "
            f"{result.score_after / result.score_before:.2f}x more coherent (mean streamline "
            f"length {result.score_before:.1f} -> {result.score_after:.1f} mm).",
            path=source_bvec_file or bvec_file,
            fix=f"Apply '{result.correction}' to the b-vectors (or run with "
                                "--gradient-check fix).")
    paths = {"bvec": str(_write_bvecs(out_dir / "dwi_checked.bvec",
                                      scan.bvecs_fsl @ result.matrix.T)),
             "v1": str(v1_file),
             "qc": str(outputs.write_json(out_dir / "gradient_check.json", qc))}
    if result.correction is not None:
        v1, v1_img = _load(v1_file)
        turn = gradient_check.correction_in_voxel_frame(result.matrix, scan.affine)
        paths["v1"] = str(outputs.save_nifti(out_dir / "v1_checked.nii.gz", v1 @ turn.T,
                                             v1_img.affine))
    return paths


@stage(outputs=("fa", "md", "rd", "ad", "v1", "qc"))
def fit_tensor(dwi_file, bval_file, bvec_file, mask_file, outliers_file, *, out_dir,
               b0_threshold=B0_THRESHOLD, max_bvalue=preprocess.DTI_MAX_BVALUE, n_jobs=1,
               mem_gb=None):
    """DTI maps (FA, MD, RD, AD) and the principal eigenvector (voxel frame).

    Uses b0 and the shells up to ``max_bvalue`` s/mm², without excluded outliers.
    ``mem_gb``: the step's memory budget; what the series and the maps leave of it sizes
    the fit's work units (:func:`pipeline.preprocess.tensor_chunk_voxels`; None: default
    units). The maps do not depend on it.
    Returns dict of paths: the maps, and ``qc`` (JSON: shells and volumes used).
    """
    out_dir = Path(out_dir)
    scan, data = _load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    use, shells = preprocess.dti_volumes(scan.bvals, b0_threshold=b0_threshold,
                                         max_bvalue=max_bvalue, excluded=excluded)
    preprocess.check_tensor_directions(scan.bvals, scan.bvecs_fsl, use,
                                       b0_threshold=b0_threshold, path=dwi_file,
                                       n_excluded=len(excluded))
    working_bytes = None
    if mem_gb is not None:
        resident = data.nbytes + 7 * 4 * mask.size  # the series and the float32 maps
        working_bytes = max(int(mem_gb * 2 ** 30) - resident, 0)
    maps = preprocess.fit_dti(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                              b0_threshold=b0_threshold, use=use, n_jobs=n_jobs,
                              memory_bytes=working_bytes)
    paths = {name: str(outputs.save_nifti(out_dir / f"{name}.nii.gz", value, scan.affine))
             for name, value in maps.items()}
    qc = {"model": "tensor (WLS)", "shells": shells, "n_volumes": int(use.sum()),
          "excluded_volumes": sorted(int(v) for v in excluded)}
    paths["qc"] = str(outputs.write_json(out_dir / "tensor_qc.json", qc))
    return paths


@stage(output="qc")
def collect_preprocessing_qc(*, out_dir, denoise_qc, motion_qc, outliers_qc, gradient_qc,
                             tensor_qc, combine_qc=None):
    """One JSON with the QC of every preprocessing node (None for a skipped step).

    ``header`` lists, per input image, the warnings its header raised on loading (from the
    denoising QC; one entry per run when runs were combined; empty for a cached denoising
    QC written before header checks existed).
    """
    def read(path):
        return json.loads(Path(path).read_text()) if path else None

    noise = read(denoise_qc)
    qc = {"denoise": noise, "motion": read(motion_qc), "outliers": read(outliers_qc),
          "gradient_check": read(gradient_qc), "tensor": read(tensor_qc),
          "combined_runs": read(combine_qc),
          "header": [run["header"] for run in noise.get("per_run", [noise]) if "header" in run]}
    return str(outputs.write_json(Path(out_dir) / "preprocessing_qc.json", qc))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@stage(outputs=("rois", "mni_z", "template_mask", "qc"))
def register_atlas(fa_file, mask_file, *, out_dir, n_jobs=1):
    """Register FA to the MNI FA template; bring the CST ROIs and MNI heights to the subject.

    ``n_jobs`` ≥ 2 puts SyN's field inversions on two threads (same result).

    Returns dict of paths: ``rois`` (subject grid, int16), ``mni_z`` (the MNI z
    coordinate, mm, of every subject voxel, from which the level bands follow;
    NaN outside the template grid), ``template_mask`` (the template brain mask on the subject
    grid, for QC) and ``qc`` (JSON: template correlation, per-ROI coverage).
    """
    out_dir = Path(out_dir)
    fa, fa_img = _load(fa_file)
    mask, _ = _load(mask_file, dtype=np.uint8)
    template_fa, template_img = _load(atlases.template_fa_path())
    template_mask, _ = _load(atlases.brain_mask_path(), dtype=np.uint8)
    template_rois, _ = _load(atlases.cst_rois_path(), dtype=np.int16)

    mapping, affine_matrix = registration.register_fa_to_template(
        fa, fa_img.affine, template_fa, template_img.affine, n_threads=min(n_jobs, 2))
    warped_fa = registration.subject_to_template(mapping, fa)
    mask_in_template = registration.subject_to_template(mapping, mask, interpolation="nearest")
    template_in_subject = registration.labels_to_subject(mapping, template_mask)
    qc = {
        "template_fa_correlation": round(registration.registration_quality(
            warped_fa, template_fa, template_mask), 3),
        # On the subject grid, so only the scanned field of view counts.
        "template_mask_dice": round(registration.dice(template_in_subject, mask), 3),
        "roi_coverage": {name: round(value, 3) for name, value in registration.roi_coverage(
            mask_in_template, template_rois, atlases.CST_ROI_LABELS).items()},
        "parameters": registration.registration_parameters(),
        "affine_template_to_subject": np.round(affine_matrix, 5).tolist(),
        # Stretch factors of the affine part: an adult head is within ~15 % of the template.
        "affine_scales": np.round(np.linalg.svd(affine_matrix[:3, :3], compute_uv=False),
                                  3).tolist(),
    }
    rois = registration.labels_to_subject(mapping, template_rois) * (mask > 0)
    mni_z = registration.template_z_in_subject(mapping, template_img.affine, template_fa.shape)
    paths = {
        "rois": outputs.save_nifti(out_dir / "cst_rois.nii.gz", rois, fa_img.affine,
                                   dtype=np.int16),
        "mni_z": outputs.save_nifti(out_dir / "mni_z.nii.gz", mni_z, fa_img.affine),
        "warped_fa": outputs.save_nifti(out_dir / "fa_in_template.nii.gz", warped_fa,
                                        template_img.affine),
        "template_mask": outputs.save_nifti(out_dir / "template_mask_in_subject.nii.gz",
                                            template_in_subject, fa_img.affine, dtype=np.uint8),
        "qc": outputs.write_json(out_dir / "registration_qc.json", qc),
    }
    return {k: str(v) for k, v in paths.items()}


#: Margin (mm) around the CST ROIs of both sides inside which CSD is fitted.
CSD_BOX_MARGIN_MM = 10.0


def cst_search_box(rois, affine, margin_mm=CSD_BOX_MARGIN_MM):
    """Boolean grid of the box around all CST ROIs (both sides), grown by ``margin_mm``.

    A CST streamline runs from the brainstem ROI to the motor target, so it stays
    in this box; fitting fibre ODFs outside it would only cost time.
    """
    inside = np.argwhere(rois > 0)
    box = np.zeros(rois.shape, dtype=bool)
    if len(inside) == 0:
        return box
    margin = np.ceil(margin_mm / np.linalg.norm(affine[:3, :3], axis=0)).astype(int)
    low = np.maximum(inside.min(axis=0) - margin, 0)
    high = np.minimum(inside.max(axis=0) + margin + 1, rois.shape)
    box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return box


@stage(outputs=("sh", "qc"))
def fit_fodf(dwi_file, bval_file, bvec_file, mask_file, fa_file, rois_file, outliers_file, *,
             out_dir, model="dti", fa_stop=0.2, b0_threshold=B0_THRESHOLD, n_jobs=1,
             md_file=None):
    """Choose the tracking model for the acquisition and, for CSD, fit the fibre ODFs.

    Parameters
    ----------
    model : {"dti", "csd", "auto"}
        See :func:`pipeline.fodf.choose_model`; "csd" on too few directions is an
        input error. On multi-shell data CSD is multi-shell multi-tissue
        (:func:`pipeline.fodf.fit_csd_msmt`), on single-shell data single-shell
        (:func:`pipeline.fodf.fit_csd`).
    md_file : path, optional
        The tensor's MD: needed for multi-shell CSD (its grey-matter and CSF responses).

    Returns dict of paths: ``sh`` (spherical-harmonic coefficients of the (white-matter)
    fibre ODF, or None for the tensor) and ``qc`` (JSON: the choice, its reason, the
    response functions).
    CSD is fitted in brain voxels with FA ≥ ``fa_stop`` (tracking stops elsewhere)
    inside :func:`cst_search_box`; outlier volumes are left out as for the tensor.
    """
    out_dir = Path(out_dir)
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    keep = np.ones(len(scan.bvals), dtype=bool)
    keep[list(excluded)] = False
    bvals, bvecs = scan.bvals[keep], scan.bvecs_fsl[keep]
    choice = fodf.choose_model(bvals, bvecs, b0_threshold, requested=model)
    if model == "csd" and choice["sh_order"] is None:
        raise InputError(
            f"CSD was asked for, but only {choice['n_directions']} distinct directions are on "
            f"the b={choice['shell_bvalue']:g} shell; order 4 needs "
            f"{fodf.SH_ORDER_BY_DIRECTIONS[-1][0]}.", path=dwi_file,
            fix="Track with the tensor (--model dti or auto).")
    qc = {**choice, "requested": model}
    sh_path = None
    if choice["model"] == "csd":
        mask = _load(mask_file, dtype=np.uint8)[0] > 0
        fa, _ = _load(fa_file)
        rois, _ = _load(rois_file, dtype=np.int16)
        fit_mask = mask & (fa >= fa_stop) & cst_search_box(rois, scan.affine)
        data = scan.img.get_fdata(dtype=np.float32)  # a memory map: the fits read their voxels
        if choice["csd_kind"] == "msmt":
            if md_file is None:
                raise ValueError("multi-shell CSD needs the tensor's MD (md_file)")
            md, _ = _load(md_file)
            sh, info = fodf.fit_csd_msmt(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                                         fa, md, b0_threshold=b0_threshold,
                                         shells=choice["shells"], sh_order=choice["sh_order"],
                                         fit_mask=fit_mask, n_jobs=n_jobs, volumes=keep)
        else:
            sh, info = fodf.fit_csd(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask, fa,
                                    b0_threshold=b0_threshold, shell=choice["shell_bvalue"],
                                    sh_order=choice["sh_order"], fit_mask=fit_mask,
                                    n_jobs=n_jobs, volumes=keep)
        sh_path = str(outputs.save_nifti(out_dir / "fodf_sh.nii", sh, scan.affine))
        qc.update(info, n_fitted_voxels=int(fit_mask.sum()), sh_basis=fodf.SH_BASIS)
    return {"sh": sh_path, "qc": str(outputs.write_json(out_dir / "fodf_qc.json", qc))}


def _centroid_mm(region, affine):
    """World mm centroid of a boolean region (None when empty)."""
    ijk = np.argwhere(region)
    return apply_affine(affine, ijk.mean(axis=0)) if len(ijk) else None


#: The CST's landmark ROIs from the brainstem up (atlas names without the hemisphere).
CST_WAYPOINTS = ("medulla", "pons", "peduncle", "plic", "motor")
#: The lowest MNI height (mm) a profile may start at, by inferior landmark: the bottom of
#: the JHU corticospinal label (medulla) or of the landmark's atlas level band.
LANDMARK_FLOOR_MNI_Z = {"medulla": -55.0, "pons": -43.5, "peduncle": -22.0}


#: A lower landmark is used when each side keeps at least this fraction of the streamlines
#: that reach the next landmark up, so that both bundles stay well sampled and a level
#: clipped by the field of view on one side does not cost that side its tract. Measured
#: with tensor tracking: a pons keeps 39-53 % of the peduncle's streamlines; a medulla
#: scanned whole only 13-30 % of the pons's (sub-philips02, sub-toshiba01: tensor
#: streamlines thin out there), cut by the field of view on one side 1.5-7 %. At 10 % the
#: medulla bundles of sub-toshiba01 (91-142 streamlines) started 6.6 mm apart in MNI height
#: and differed by 0.018 in mean FA between the scan and its x-flipped copy; at 30 % they
#: start in the lower pons, as stable as before.
LANDMARK_KEEP_FRACTION = 0.3


def _candidate_waypoints(coverage, min_coverage):
    """The CST's waypoint chains to try, from the lowest brainstem ROI scanned on both sides.

    Each chain runs from a brainstem landmark up to the motor target: medulla, pons
    and peduncle as far as their ROIs are covered on both sides (the peduncle
    chain always comes last).
    """
    chains = []
    for lowest in ("medulla", "pons"):
        if chains or all(coverage.get(f"{lowest}_{HEMI[s]}", 0) >= min_coverage for s in SIDES):
            chains.append(CST_WAYPOINTS[CST_WAYPOINTS.index(lowest):])
    return chains + [CST_WAYPOINTS[CST_WAYPOINTS.index("peduncle"):]]


def _select_cst(streamlines, rois, affine, waypoints):
    """Per side, the streamlines through all of its own waypoints that touch none of the
    other side's peduncle, PLIC or motor target."""
    labels = atlases.CST_ROI_LABELS
    selected = {}
    for side in SIDES:
        h, other = HEMI[side], HEMI["right" if side == "left" else "left"]
        selected[side] = tracking.select_tract(
            streamlines, rois, affine, required=[labels[f"{r}_{h}"] for r in waypoints],
            forbidden=[labels[f"{r}_{other}"] for r in ("peduncle", "plic", "motor")])
    return selected


def _lowest_kept_landmark(streamlines, rois, affine, chains):
    """The lowest waypoint chain that each side follows with enough streamlines.

    Returns (waypoints, selected streamlines per side, streamline counts per tried
    landmark for the QC).
    """
    selections = [_select_cst(streamlines, rois, affine, chain) for chain in chains]
    counts = {chain[0]: {s: len(sel[s]) for s in SIDES} for chain, sel in zip(chains, selections)}
    for i, (chain, selected) in enumerate(zip(chains, selections)):
        upper = selections[i + 1] if i + 1 < len(chains) else None
        if upper is None or all(len(selected[s]) >= LANDMARK_KEEP_FRACTION * len(upper[s])
                                for s in SIDES):
            return chain, selected, counts


@stage(outputs=("left", "right", "qc"))
def track_cst(fa_file, v1_file, mask_file, rois_file, registration_qc_file, mni_z_file, *,
              out_dir,
              sh_file=None, fodf_qc_file=None, direction="prob", fa_stop=0.2, gap_fa=0.1,
              corridor_radius_mm=8.0, max_angle_deg=45.0, step_mm=0.5, seeds_per_voxel=10,
              min_coverage=0.6, n_jobs=1, seed=0, dask_scheduler=None):
    """Track, select, orient, clip and clean CST_L and CST_R.

    With ``sh_file`` (CSD fibre ODFs from :func:`fit_fodf`) the tracking follows
    them, ``direction`` "prob" or "det"; without, the tensor's principal direction
    (deterministic). The model choice (``fodf_qc_file``) is kept in the tracking QC.

    The CST runs through its waypoint ROIs from the lowest brainstem level scanned
    on both sides and followed by both tracts (:func:`_lowest_kept_landmark`:
    medulla, else pons, else peduncle) to the
    motor target. Tracking stops below ``fa_stop``, except inside each side's CST
    corridor (within ``corridor_radius_mm`` of the line through its waypoints'
    centroids), where it crosses FA down to ``gap_fa``
    (:func:`pipeline.tracking.bridge_low_fa`): a lesion must not erase the tract
    it damages. ``gap_fa`` ≥ ``fa_stop`` turns this off.

    The seed chunks are tracked over ``n_jobs`` local workers, or on the Dask
    cluster named by ``dask_scheduler`` (an address, or ``"slurm"``; see
    :func:`pipeline.parallel.dask_backend`); the streamlines are the same.

    Both sides are clipped from one MNI height (``mni_z_file``, from
    :func:`register_atlas`; :func:`pipeline.tracking.common_start_height`: the
    landmark's floor, or higher where fewer than 80 % of either side's
    streamlines reach down) to their motor target, so that node 0 lies at the same
    anatomy on both sides, and on repeated scans.

    Returns dict of paths: ``left``, ``right`` (.trk, world mm, inferior end
    first, clipped as above) and ``qc``.
    """
    out_dir = Path(out_dir)
    fa, fa_img = _load(fa_file)
    v1, _ = _load(v1_file)
    mask = _load(mask_file, dtype=np.uint8)[0] > 0
    rois, _ = _load(rois_file, dtype=np.int16)
    mni_z, _ = _load(mni_z_file)
    coverage = json.loads(Path(registration_qc_file).read_text())["roi_coverage"]
    labels = atlases.CST_ROI_LABELS
    chains = _candidate_waypoints(coverage, min_coverage)
    affine = fa_img.affine

    seed_region = np.zeros(mask.shape, dtype=bool)
    for side in SIDES:
        for roi in chains[0][:-1]:  # every waypoint below the motor target
            seed_region |= rois == labels[f"{roi}_{HEMI[side]}"]
    seed_region &= fa >= fa_stop
    seeds = tracking.seeds_in_mask(seed_region, affine, seeds_per_voxel=seeds_per_voxel,
                                   random_seed=seed)
    corridor = np.zeros(mask.shape, dtype=bool)
    for side in SIDES:
        centroids = [_centroid_mm(rois == labels[f"{roi}_{HEMI[side]}"], affine)
                     for roi in chains[0]]
        centroids = [c for c in centroids if c is not None]
        if len(centroids) >= 2:
            corridor |= tracking.corridor_mask(np.array(centroids), mask.shape, affine,
                                               radius_mm=corridor_radius_mm)
    corridor &= mask
    brain_fa = np.where(mask, fa, 0)
    stop_map = tracking.bridge_low_fa(brain_fa, corridor, fa_stop=fa_stop,
                                      gap_fa=gap_fa)
    common = dict(fa_stop=fa_stop, max_angle_deg=max_angle_deg, step_mm=step_mm, n_jobs=n_jobs,
                  random_seed=seed, dask_scheduler=dask_scheduler)
    choice = json.loads(Path(fodf_qc_file).read_text()) if fodf_qc_file else None
    if sh_file:
        sh, _ = _load(sh_file)
        streamlines = tracking.track_csd(seeds, sh, stop_map, affine, direction=direction,
                                         **common)
        kind = ("multi-shell multi-tissue CSD (white-matter fODF)"
                if choice and choice.get("csd_kind") == "msmt" else "CSD")
        method = f"{kind}, {'probabilistic' if direction == 'prob' else 'deterministic'}"
    else:
        streamlines = tracking.track_dti_deterministic(seeds, v1, stop_map, mask, affine,
                                                       **common)
        method = "tensor, deterministic"

    qc = {"method": method, "n_seeds": int(len(seeds)), "n_streamlines_tracked": len(streamlines),
          "corridor_voxels": int(corridor.sum()),
          "bridged_voxels": int(np.count_nonzero(stop_map != brain_fa)),
          "sides": {}}
    if choice is not None:
        qc["model_choice"] = choice
    waypoints, chosen, qc["landmark_streamlines"] = _lowest_kept_landmark(
        streamlines, rois, affine, chains)
    qc["inferior_landmark"], qc["waypoints"] = waypoints[0], list(waypoints)
    selected = {side: tracking.orient_inferior_first(
        chosen[side], tracking.heights_along(chosen[side], mni_z, affine)) for side in SIDES}
    start_height = tracking.common_start_height([selected[s][1] for s in SIDES],
                                                floor=LANDMARK_FLOOR_MNI_Z[waypoints[0]])
    qc["profile_start_mni_z"] = round(start_height, 2) if np.isfinite(start_height) else None
    paths = {}
    for side in SIDES:
        h = HEMI[side]
        clipped = tracking.clip_from_height(*selected[side], rois, affine,
                                            start_height=start_height,
                                            upper=labels[f"motor_{h}"])
        cleaned = tracking.clean_bundle(clipped)
        qc["sides"][side] = {"selected": len(selected[side][0]), "clipped": len(clipped),
                             "cleaned": len(cleaned)}
        paths[side] = outputs.save_trk(out_dir / f"cst_{h}.trk", cleaned, fa_img)
    paths["qc"] = outputs.write_json(out_dir / "tracking_qc.json", qc)
    return {k: str(v) for k, v in paths.items()}


#: pyAFQ's names of the two CSTs (its ``tractID`` values).
AFQ_TRACT_NAMES = {"left": "Left Corticospinal", "right": "Right Corticospinal"}


@stage(outputs=("tsv", "json"))
def tract_profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, mni_z_file,
                   rois_file, dwi_file, bval_file, bvec_file, outliers_file, *, out_dir, subject,
                   b0_threshold=B0_THRESHOLD, max_bvalue=preprocess.DTI_MAX_BVALUE, seed=0):
    """100-node profiles of both CSTs (TSV), per-side summaries and asymmetry (JSON).

    The JSON also holds :data:`pipeline.uncertainty.N_BOOTSTRAP` bootstrap
    replicates of the asymmetry profile (``fa_ai_bootstrap``; wild bootstrap of
    the tensor fit on the preprocessed series ``dwi_file``, with the volumes the
    tensor was fitted on, and resampled streamlines; same ``seed``, same replicates)
    and the per-node standard errors of FA and AI derived from them.

    Each node's level is the atlas band (:data:`atlases.LEVEL_Z_RANGES`) of its
    MNI height (``mni_z_file``, :func:`register_atlas`), also kept per node
    (``node_mni_z``).

    The TSV has our columns (``tract, node, fa, md, rd, ad, x, y, z, level``)
    and pyAFQ's (``subjectID, tractID, nodeID, dti_fa, dti_md, dti_rd, dti_ad``;
    ``tractID`` as pyAFQ names the CSTs, :data:`AFQ_TRACT_NAMES`), so scripts
    written for pyAFQ's tract profiles read it unchanged.
    """
    out_dir = Path(out_dir)
    maps = {}
    for name, path in zip(tractometry.PROFILE_METRICS, (fa_file, md_file, rd_file, ad_file)):
        maps[name], img = _load(path)
    affine = img.affine
    mni_z, _ = _load(mni_z_file)
    rois, _ = _load(rois_file, dtype=np.int16)

    rows, summary, node_levels, node_xyz, fa_profiles, bundles = [], {}, {}, {}, {}, {}
    node_mni_z = {}
    for side, trk in zip(SIDES, (left_trk, right_trk)):
        bundle = bundles[side] = outputs.load_streamlines(trk)
        prof = tractometry.tract_profiles(bundle, maps, affine)
        summary[side] = tractometry.bundle_summary(bundle, prof)
        xyz = prof["xyz"]
        node_mni_z[side] = tractometry.values_at_points(mni_z, xyz, affine)
        node_levels[side] = tractometry.levels_at_heights(node_mni_z[side],
                                                          atlases.LEVEL_Z_RANGES)
        summary[side]["fa_by_level"] = tractometry.mean_by_level(prof["fa"], node_levels[side])
        node_xyz[side] = xyz
        fa_profiles[side] = prof["fa"]
        for node in range(tractometry.N_NODES):
            row = {"tract": tractometry.TRACT_NAMES[side], "node": node}
            row.update({m: _fmt(prof[m][node]) for m in tractometry.PROFILE_METRICS})
            row.update({"x": _fmt(xyz[node, 0], 2), "y": _fmt(xyz[node, 1], 2),
                        "z": _fmt(xyz[node, 2], 2), "level": node_levels[side][node] or "n/a"})
            row.update({"subjectID": subject, "tractID": AFQ_TRACT_NAMES[side], "nodeID": node})
            row.update({f"dti_{m}": row[m] for m in tractometry.PROFILE_METRICS})
            rows.append(row)

    plic = {side: tractometry.roi_mean(maps["fa"], rois,
                                       atlases.CST_ROI_LABELS[f"plic_{HEMI[side]}"])
            for side in SIDES}
    ai_profile = tractometry.asymmetry_index(fa_profiles["left"], fa_profiles["right"])
    result = {
        "cst": summary,
        "plic_fa": plic,
        "fa_ai_tract": _finite_or_none(tractometry.asymmetry_index(
            summary["left"]["fa_mean"] or np.nan, summary["right"]["fa_mean"] or np.nan)),
        "fa_ai_plic": _finite_or_none(tractometry.asymmetry_index(plic["left"], plic["right"])),
        "fa_ai_profile": [_finite_or_none(v) for v in ai_profile],
        "node_levels": node_levels,
        "node_xyz": {s: np.round(node_xyz[s], 2).tolist() for s in SIDES},
        "node_mni_z": {s: [_finite_or_none(v, 2) for v in node_mni_z[s]] for s in SIDES},
        **_profile_uncertainty(bundles, maps["fa"], affine, dwi_file, bval_file, bvec_file,
                               outliers_file, b0_threshold=b0_threshold,
                               max_bvalue=max_bvalue, seed=seed),
    }
    tsv = out_dir / "profiles.tsv"
    with outputs.atomic_path(tsv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return {"tsv": str(tsv),
            "json": str(outputs.write_json(out_dir / "profiles.json", result))}


def _profile_uncertainty(bundles, fa, affine, dwi_file, bval_file, bvec_file, outliers_file, *,
                         b0_threshold, max_bvalue, seed):
    """Bootstrap replicates of the AI profile and per-node standard errors (JSON-ready)."""
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    use, _ = preprocess.dti_volumes(scan.bvals, b0_threshold=b0_threshold,
                                    max_bvalue=max_bvalue, excluded=excluded)
    series = scan.img.dataobj

    def signal_of(ijk):
        # Only the sampled voxels' bounding box is read from the (uncompressed) series.
        low, high = ijk.min(axis=0), ijk.max(axis=0) + 1
        box = np.asarray(series[low[0]:high[0], low[1]:high[1], low[2]:high[2]],
                         dtype=np.float32)
        return box[tuple((ijk - low).T)][:, use]

    replicates = uncertainty.asymmetry_replicates(
        bundles, fa, signal_of, affine, bvals=scan.bvals[use], bvecs_fsl=scan.bvecs_fsl[use],
        b0_threshold=b0_threshold, random_seed=seed)
    if not replicates:
        return {"fa_ai_bootstrap": None, "fa_ai_se": None, "fa_se": None}
    return {"fa_ai_bootstrap": np.round(replicates["ai"], 5).tolist(),
            "fa_ai_se": [_finite_or_none(v) for v in np.nanstd(replicates["ai"], axis=0)],
            "fa_se": {side: [_finite_or_none(v) for v in np.nanstd(replicates["fa"][side], axis=0)]
                      for side in SIDES}}


def _fmt(value, digits=6):
    return "n/a" if not np.isfinite(value) else round(float(value), digits)


def _finite_or_none(value, digits=5):
    value = float(value)
    return round(value, digits) if np.isfinite(value) else None


#: Quality-control limits below which the CST is reported as not assessable.
DEFAULT_QC_LIMITS = {"min_streamlines": 20, "min_roi_coverage": 0.6,
                     # The cerebral peduncles anchor the brainstem end of every profile, so
                     # they must lie in the field of view almost whole: healthy scans here
                     # cover 0.996-1.0 of them; sub-uih01, whose field of view stops at the
                     # midbrain, 0.53-0.68 (varying with the registration).
                     "min_brainstem_coverage": 0.9,
                     "min_template_correlation": 0.4, "min_template_mask_dice": 0.6,
                     # Healthy scans here: 0.95-1.07; a partial field of view squashed the
                     # template to 0.82 along one axis.
                     "affine_scale_range": [0.85, 1.2]}


def quality_control(registration_qc, tracking_qc, summary, limits):
    """Known silent-failure patterns → (assessable, reasons)."""
    reasons = []
    coverage = registration_qc["roi_coverage"]
    for roi, where, limit in (
            ("peduncle", "the brainstem (cerebral peduncles)", "min_brainstem_coverage"),
            ("plic", "the internal capsules", "min_roi_coverage"),
            ("motor", "the motor cortex", "min_roi_coverage")):
        low = [s for s in SIDES if coverage.get(f"{roi}_{HEMI[s]}", 0) < limits[limit]]
        if low:
            reasons.append(f"The field of view or brain mask does not cover {where} "
                           f"({', '.join(low)}): the CST cannot be followed along its course.")
    r = registration_qc["template_fa_correlation"]
    overlap = registration_qc["template_mask_dice"]
    if r < limits["min_template_correlation"] or overlap < limits["min_template_mask_dice"]:
        reasons.append(f"Registration to the MNI FA template looks failed (FA correlation "
                       f"{r:.2f}, limit {limits['min_template_correlation']}; brain-mask Dice "
                       f"{overlap:.2f}, limit {limits['min_template_mask_dice']}).")
    low, high = limits["affine_scale_range"]
    scales = registration_qc["affine_scales"]
    if min(scales) < low or max(scales) > high:
        reasons.append(f"The template had to be stretched implausibly to fit (scale factors "
                       f"{', '.join(f'{v:.2f}' for v in scales)}; expected {low}-{high}): "
                       f"the field of view may miss part of the brain.")
    for side in SIDES:
        n = summary[side]["n_streamlines"]
        if n < limits["min_streamlines"]:
            reasons.append(f"Too few {side} CST streamlines ({n} < {limits['min_streamlines']}).")
    return not reasons, reasons


def preprocessing_notices(pre_qc):
    """What a reader must know about the input and what preprocessing changed (header
    warnings, corrected table, dropped volumes)."""
    notices = [f"Image header ({run['file']}): {warning}"
               for run in pre_qc.get("header") or [] for warning in run["warnings"]]
    check = pre_qc.get("gradient_check") or {}
    if check.get("status") == "corrected":
        notices.append(f"The gradient table was corrected ({check['correction']}): fibre "
                       f"coherence {check['score_before']:.1f} -> {check['score_after']:.1f} mm "
                       f"mean streamline length. Check the b-vectors of this scan.")
    flagged = (pre_qc.get("outliers") or {}).get("volumes", [])
    if flagged:
        what = "left out of the tensor fit" if (pre_qc["outliers"].get("excluded")) else \
            "kept in the fit (--outliers report)"
        notices.append(f"{len(flagged)} outlier volume(s) ({', '.join(map(str, flagged))}) "
                       f"{what}.")
    return notices


#: Head motion that makes a run's QC carry a notice (it stays assessable). No fixed cut-off
#: for a diffusion run is published: FSL's eddy QC (Bastiani et al. 2019,
#: doi:10.1016/j.neuroimage.2018.09.073) ranks a subject's motion against its own study, and
#: the 0.5 mm framewise displacement (FD) at which Power et al. 2012
#: (doi:10.1016/j.neuroimage.2011.10.018) censor fMRI frames does not carry over: diffusion
#: volumes are seconds apart and change contrast with every direction, so FD runs higher
#: (0.44-1.23 mm mean in the cooperative scans of ../shared/data: siemens01, philips02,
#: toshiba01). These levels are therefore this project's, set on those scans: mean FD above
#: 1.5 mm, or a translation from the reference of more than 2 mm (about one voxel of
#: 1.75-3 mm) along any axis. sub-philips01 (4.6 mm drift), sub-siemens02 (jumps) and both
#: runs of sub-siemens03 (2.6-3.0 mm) get the notice. Why it matters: motion alone shifts FA
#: and diffusivities (Yendiki et al. 2014, doi:10.1016/j.neuroimage.2013.11.027).
MOTION_NOTICE_LIMITS = {"mean_framewise_displacement_mm": 1.5, "max_translation_mm": 2.0}


def motion_notices(motion_qc, limits=None):
    """A QC notice (not a failure) when the head moved more than :data:`MOTION_NOTICE_LIMITS`.

    ``motion_qc``: the motion step's QC (``qc.motion`` of the metrics), None when motion
    correction was off. Returns a list with at most one sentence, giving the measured
    values, the limits and their source.
    """
    limits = {**MOTION_NOTICE_LIMITS, **(limits or {})}
    if not motion_qc:
        return []
    measured = [(key, what, motion_qc.get(key)) for key, what in (
        ("mean_framewise_displacement_mm", "mean framewise displacement (Power et al. 2012)"),
        ("max_translation_mm", "largest translation from the reference"))]
    if not any(value is not None and value > limits[key] for key, _, value in measured):
        return []
    values = ", ".join(f"{what} {value:.2f} mm (notice above {limits[key]:g} mm)"
                       for key, what, value in measured if value is not None)
    return [f"Heavy head motion: {values}. These notice levels were set on this project's "
            f"scans: no fixed cut-off for diffusion MRI is published. The volumes were "
            f"realigned, but motion also biases FA and diffusivities (Yendiki et al. 2014): "
            f"check the motion plot, and compare with other runs with care."]


@stage(output="metrics")
def assess(profiles_json, registration_qc_file, tracking_qc_file, preprocess_qc_file, *,
           out_dir, subject, entities, input_files, parameters, thresholds=None,
           qc_limits=None, prep_plic_ai=prognosis.DEFAULT_PREP_PLIC_AI, clinical=None,
           prep2_thresholds=None, execution=None):
    """Localisation, prognosis, QC and provenance → the metrics JSON (public contract).

    ``clinical``: the participant's bedside scores for PREP2
    (:func:`pipeline.clinical.read_clinical_scores`), recorded under ``clinical``.
    ``parameters``: the settings recorded in the provenance; ``execution``: the settings
    that do not change results (``workflows.execution.EXECUTION_SETTINGS``), recorded
    before them (those of the run that made the assessment).
    """
    profiles = json.loads(Path(profiles_json).read_text())
    reg_qc = json.loads(Path(registration_qc_file).read_text())
    trk_qc = json.loads(Path(tracking_qc_file).read_text())
    pre_qc = json.loads(Path(preprocess_qc_file).read_text())
    noise = pre_qc["denoise"]
    limits = {**DEFAULT_QC_LIMITS, **(qc_limits or {})}
    assessable, reasons = quality_control(reg_qc, trk_qc, profiles["cst"], limits)
    loc = localization.localize_profiles(profiles, thresholds=thresholds, assessable=assessable)
    fa_ai_plic = profiles["fa_ai_plic"]
    prog = prognosis.prognosis_summary(loc, np.nan if fa_ai_plic is None else fa_ai_plic,
                                       prep_plic_ai=prep_plic_ai, qc_reasons=reasons,
                                       clinical=clinical, prep2_thresholds=prep2_thresholds,
                                       fa_by_level={s: profiles["cst"][s].get("fa_by_level")
                                                    for s in SIDES})
    coverage = reg_qc["roi_coverage"]
    metrics = {
        "subject": subject,
        "entities": entities,
        "cst": profiles["cst"],
        "asymmetry": {
            "definition": "AI = (FA_L - FA_R) / (FA_L + FA_R); positive: left FA higher",
            "fa_ai_tract": profiles["fa_ai_tract"],
            "fa_ai_plic": fa_ai_plic,
            "plic_fa": profiles["plic_fa"],
            "fa_ai_profile": profiles["fa_ai_profile"],
            # Bootstrap standard errors (pipeline.uncertainty): this scan's own precision.
            "fa_ai_profile_se": profiles.get("fa_ai_se"),
            "fa_profile_se": profiles.get("fa_se"),
        },
        "localization": loc,
        "prognosis": prog,
        "clinical": clinical,
        "qc": {
            "assessable": assessable,
            "warnings": reasons,
            "limits": limits,
            "brainstem_covered": all(coverage.get(f"peduncle_{HEMI[s]}", 0)
                                     >= limits["min_brainstem_coverage"] for s in SIDES),
            "pons_covered": trk_qc["inferior_landmark"] in ("medulla", "pons"),
            "medulla_covered": trk_qc["inferior_landmark"] == "medulla",
            "registration": reg_qc,
            "tracking": trk_qc,
            "preprocessing": {"denoise": noise["method"], "brain_mask_ml": noise["brain_mask_ml"],
                              "noise_sigma_median": noise["noise_sigma_median"],
                              "snr_b0": noise["snr_b0"], "tensor": pre_qc["tensor"]},
            "notices": preprocessing_notices(pre_qc) + motion_notices(pre_qc["motion"]),
            "noise": noise,
            "motion": pre_qc["motion"],
            "outliers": pre_qc["outliers"],
            "gradient_check": pre_qc["gradient_check"],
            "header": pre_qc.get("header", []),
            # What a negative result excludes at this scan's precision (calibrated rule).
            "detectable_fa_drop": loc.get("detectable_fa_drop"),
            "combined_runs": pre_qc.get("combined_runs"),
        },
        "provenance": outputs.provenance(inputs=input_files,
                                         parameters={**(execution or {}), **parameters}),
    }
    return str(outputs.write_json(Path(out_dir) / "metrics.json", metrics))


@stage(output="html")
def make_report(metrics_json, profiles_tsv, fa_file, v1_file, left_trk, right_trk, mask_file,
                rois_file, template_mask_file, *, out_dir, n_jobs=1):
    """The run's HTML report (:func:`pipeline.report.write_report`) from its metrics JSON.

    Returns the path of ``report.html``.
    """
    from .report import write_report

    metrics = json.loads(Path(metrics_json).read_text())
    return str(write_report(Path(out_dir) / "report.html", metrics=metrics,
                            profiles_tsv=profiles_tsv, fa_file=fa_file,
                            tract_files={"left": left_trk, "right": right_trk},
                            mask_file=mask_file, rois_file=rois_file, v1_file=v1_file,
                            template_in_subject_file=template_mask_file, n_jobs=n_jobs))


#: Derivative file names (after the ``sub-X[_entities]`` stem) and what each holds.
DERIVATIVES = {
    "fa": ("_model-tensor_param-fa_dwimap.nii.gz", "Fractional anisotropy (DTI, WLS)"),
    "md": ("_model-tensor_param-md_dwimap.nii.gz", "Mean diffusivity, mm^2/s (DTI, WLS)"),
    "rd": ("_model-tensor_param-rd_dwimap.nii.gz", "Radial diffusivity, mm^2/s (DTI, WLS)"),
    "ad": ("_model-tensor_param-ad_dwimap.nii.gz", "Axial diffusivity, mm^2/s (DTI, WLS)"),
    "mask": ("_desc-brain_mask.nii.gz", "Brain mask (median Otsu on the mean b0 and the mean DWI)"),
    "rois": ("_desc-CSTrois_dseg.nii.gz", "CST ROIs warped from the MNI atlas (see atlases/); "
             "labels in the .tsv beside it"),
    "left": ("_hemi-L_desc-CST_tractography.trk",
             "Left CST streamlines, world RAS mm, inferior end first; TrackVis .trk and "
             "the same streamlines in TRX (.trx)"),
    "right": ("_hemi-R_desc-CST_tractography.trk",
              "Right CST streamlines, world RAS mm, inferior end first; TrackVis .trk and "
              "the same streamlines in TRX (.trx)"),
    "profiles_tsv": ("_desc-profiles_tractometry.tsv",
                     "100-node CST profiles; node 0 at the brainstem end; the .csv beside it "
                     "holds them in pyAFQ's tract-profile layout (for AFQ-Insight)"),
}
#: Sidecar fields of one derivative beyond the common ones: the Type BIDS recommends for a
#: mask, and the description of the column the ROIs' label table adds to BIDS's.
_SIDECAR_FIELDS = {"mask": {"Type": "Brain"},
                   "rois": {"level": {"Description": "Level of the neuraxis the ROI lies at "
                                                     "(atlases/README.md)"}}}
#: Readable names of the CST ROIs' regions (atlases/README.md), for the ROIs' label table.
_ROI_REGIONS = {"motor": "motor target", "plic": "posterior limb of the internal capsule",
                "peduncle": "cerebral peduncle", "pons": "corticospinal tract in the pons",
                "medulla": "corticospinal tract in the medulla"}
#: Columns of the profiles CSV: pyAFQ's tract-profile layout, the one AFQ-Insight reads.
AFQ_COLUMNS = ("subjectID", "sessionID", "tractID", "nodeID",
               *(f"dti_{m}" for m in tractometry.PROFILE_METRICS))


def write_profile_tables(source_tsv, tsv_path, stem):
    """A run's profiles TSV with the run's identity added, and the same profiles as CSV in
    pyAFQ's layout (:data:`AFQ_COLUMNS`) beside it.

    Both get ``sessionID``: pyAFQ and AFQ-Insight tell repeated acquisitions of one
    subject apart by it alone (AFQ-Insight takes every other column for a metric, so a
    text column such as ``run`` would stop it, and rows that differ only there would
    be averaged), so it holds the run's entities after the subject (``dir-AP``,
    ``ses-01_dir-AP``), or ``unknown``, pyAFQ's value, when there are none. The TSV
    also gets ``run``, the run's name as in the group table (``sub-01_dir-AP``).

    Parameters
    ----------
    source_tsv : path-like
        The profiles TSV of :func:`tract_profiles`.
    tsv_path : path-like
        The TSV to write; the CSV gets its name with ``.csv``.
    stem : str
        The run's name, ``sub-<label>[_<entities>]``.

    Returns
    -------
    list of str
        The TSV and the CSV.
    """
    session = stem.partition("_")[2] or "unknown"
    with open(source_tsv, newline="") as handle:
        rows = [{**row, "sessionID": session, "run": stem}
                for row in csv.DictReader(handle, delimiter="\t")]
    tsv_path = Path(tsv_path)
    csv_path = tsv_path.with_suffix(".csv")
    with outputs.atomic_path(tsv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    with outputs.atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=AFQ_COLUMNS)
        writer.writeheader()
        # An empty field, as pyAFQ writes a missing value (pandas' NaN).
        writer.writerows({c: "" if row[c] == "n/a" else row[c] for c in AFQ_COLUMNS}
                         for row in rows)
    return [str(tsv_path), str(csv_path)]


def _write_roi_labels(dseg_path):
    """The label table (``_dseg.tsv``) of the CST ROI segmentation ``dseg_path``."""
    lines = ["index\tname\tabbreviation\tlevel"]
    for abbreviation, index in sorted(atlases.CST_ROI_LABELS.items(), key=lambda item: item[1]):
        region, hemi = abbreviation.rsplit("_", 1)
        side = {"L": "left", "R": "right"}[hemi]
        lines.append(f"{index}\t{side} {_ROI_REGIONS[region]}\t{abbreviation}\t"
                     f"{atlases.CST_ROI_LEVELS[abbreviation]}")
    return outputs.write_text(dseg_path.with_name(dseg_path.name.replace(".nii.gz", ".tsv")),
                              "\n".join(lines) + "\n")


@stage(output="written")
def write_derivatives(fa, md, rd, ad, mask, rois, left, right, profiles_tsv, metrics, report, *,
                      report_dir, stem, derivatives_dir, source_files, parameters):
    """Write a run's results into the BIDS-Derivatives tree, each file atomically,
    each with a JSON sidecar; the metrics JSON is written last, so its presence
    means the run's outputs are complete.

    ``fa`` to ``profiles_tsv`` are the files of :data:`DERIVATIVES` (by its keys),
    ``metrics`` the metrics JSON and ``report`` the HTML report, copied into
    ``report_dir`` (the root of the derivatives).

    The images are written again with the input DWI's xform codes
    (:func:`pipeline.outputs.save_nifti`), the ROI segmentation gets its label
    table (``_dseg.tsv``), each tractogram a TRX copy (``.trx``), and the
    profiles their run columns and pyAFQ's CSV (:func:`write_profile_tables`).

    Returns the list of written paths.
    """
    import shutil

    files = {"fa": fa, "md": md, "rd": rd, "ad": ad, "mask": mask, "rois": rois, "left": left,
             "right": right, "profiles_tsv": profiles_tsv}
    derivatives_dir = Path(derivatives_dir)
    # The input image (with --combine-runs, the first run's: the grid of them all).
    dwi = source_files[0]
    dwi_img = nib.load(str(dwi))
    written = []

    def copy(source, target):
        with outputs.atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        written.append(str(target))

    for key, (suffix, description) in DERIVATIVES.items():
        target = derivatives_dir / f"{stem}{suffix}"
        spatial_reference = None
        if suffix.endswith(".nii.gz"):
            img = nib.load(str(files[key]))
            written.append(str(outputs.save_nifti(target, np.asanyarray(img.dataobj), img.affine,
                                                  reference=dwi_img,
                                                  dtype=img.get_data_dtype())))
            spatial_reference = dwi
        elif suffix.endswith(".trk"):
            copy(files[key], target)
            written.append(str(outputs.save_trx(target.with_suffix(".trx"),
                                                outputs.load_streamlines(files[key]),
                                                nib.load(str(files["fa"])))))
        else:  # the profiles TSV
            written += write_profile_tables(files[key], target, stem)
        if key == "rois":
            written.append(str(_write_roi_labels(target)))
        written.append(str(outputs.write_sidecar(
            target, description=description, sources=source_files,
            spatial_reference=spatial_reference, parameters=parameters,
            extra=_SIDECAR_FIELDS.get(key))))
    copy(report, Path(report_dir) / f"{stem}.html")
    copy(metrics, derivatives_dir / f"{stem}_desc-cst_metrics.json")
    return written
