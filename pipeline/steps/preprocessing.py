"""Preprocessing stages, run by run: brain mask, denoising, Gibbs-ringing removal, runs
combined, motion correction, outlier volumes, gradient-table check and the tensor fit."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

import atlases

from ..errors import InputError
from ..io import outputs
from ..io.dwi import B0_THRESHOLD
from ..preprocessing import combine, gibbs, gradient_check, motion, outliers
from ..preprocessing import denoise as denoise_module
from ..preprocessing import mask as masking
from ..reconstruction import registration, tensor
from ..stage import stage
from .files import load_array, load_scan, write_bvecs


@stage(outputs=("b0", "mask"))
def brain_mask(dwi_file, bval_file, bvec_file, *, out_dir, b0_threshold=B0_THRESHOLD):
    """Mean b0 (the reference every volume is aligned to) and the brain mask
    (:func:`pipeline.preprocessing.mask.brain_mask`, with the template's brain placed by an
    affine registration of a quick FA).

    Returns dict of paths: ``b0``, ``mask``.
    """
    out_dir = Path(out_dir)
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    b0 = masking.mean_b0(data, scan.b0_mask)
    dwi_mean = masking.mean_dwi(data, scan.b0_mask)
    mask = masking.brain_mask(b0, dwi_mean, scan.affine)
    # A quick FA (OLS, unprocessed) in that mask places the template's brain, which then
    # adds the brainstem that the scan's contrast may have lost.
    use, _ = tensor.dti_volumes(scan.bvals, b0_threshold=b0_threshold)
    fa = tensor.fit_dti(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
                        b0_threshold=b0_threshold, use=use, fit_method="OLS")["fa"]
    template_fa, template_img = load_array(atlases.template_fa_path())
    template_brain = registration.template_mask_in_subject(
        np.nan_to_num(fa), scan.affine, template_fa, template_img.affine,
        load_array(atlases.brain_mask_path(), dtype=np.uint8)[0])
    mask = masking.brain_mask(b0, dwi_mean, scan.affine, template_brain=template_brain)
    return {"b0": str(outputs.save_nifti(out_dir / "b0.nii.gz", b0, scan.affine)),
            "mask": str(outputs.save_nifti(out_dir / "mask.nii.gz", mask, scan.affine,
                                           dtype=np.uint8))}


@stage(outputs=("dwi", "qc"))
def denoise(dwi_file, bval_file, bvec_file, mask_file, *, out_dir, method="mppca",
            b0_threshold=B0_THRESHOLD, n_jobs=1, mem_gb=None):
    """Thermal-noise removal (MP-PCA, Patch2Self or none).

    ``mem_gb``: the step's memory budget (None: MP-PCA's fixed default chunks). The
    series stays in memory; MP-PCA's slabs and patch batches share what is left
    (:func:`pipeline.preprocessing.denoise.mppca_slab_thickness`), and each denoised slab
    goes to the output file as it finishes. The result does not depend on it.

    Returns dict of paths: ``dwi`` and ``qc`` (JSON: method, noise sigma, SNR, mask volume,
    and ``header``: the input image's name and the warnings its header raised on loading,
    see :func:`pipeline.io.dwi.check_header`; recorded here, as denoising is the first step
    that reads the input image and writes a QC file).
    """
    out_dir = Path(out_dir)
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
    measured_b0 = masking.mean_b0(data, scan.b0_mask)
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
    the loaded series (:func:`pipeline.preprocessing.gibbs.remove_gibbs_ringing`).

    Returns dict of paths: ``dwi``.
    """
    img = nib.load(str(dwi_file))
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
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
        scan, data = load_scan(dwi, bval, bvec, b0_threshold)
        loaded.append({"data": data, "bvals": scan.bvals, "bvecs_fsl": scan.bvecs_fsl,
                       "affine": scan.affine, "b0": masking.mean_b0(data, scan.b0_mask)})
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
            "bvec": str(write_bvecs(out_dir / "dwi_combined.bvec", bvecs)),
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
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
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
            "bvec": str(write_bvecs(out_dir / "dwi_motion.bvec", result.bvecs_fsl)),
            "qc": str(outputs.write_json(out_dir / "motion_qc.json", qc))}


@stage(outputs=("qc",))
def detect_outliers(dwi_file, bval_file, bvec_file, mask_file, motion_qc_file, *, out_dir,
                    b0_threshold=B0_THRESHOLD, action="exclude"):
    """Volumes with signal dropout or extreme motion.

    ``action`` "exclude" leaves them out of the tensor fit; "report" only lists them.
    Returns dict of paths: ``qc`` (JSON: volumes, reasons, dropped slices, excluded).
    """
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
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
    :func:`pipeline.preprocessing.gradient_check.correction_in_voxel_frame`). So the tensor
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
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
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
    paths = {"bvec": str(write_bvecs(out_dir / "dwi_checked.bvec",
                                     scan.bvecs_fsl @ result.matrix.T)),
             "v1": str(v1_file),
             "qc": str(outputs.write_json(out_dir / "gradient_check.json", qc))}
    if result.correction is not None:
        v1, v1_img = load_array(v1_file)
        turn = gradient_check.correction_in_voxel_frame(result.matrix, scan.affine)
        paths["v1"] = str(outputs.save_nifti(out_dir / "v1_checked.nii.gz", v1 @ turn.T,
                                             v1_img.affine))
    return paths


@stage(outputs=("fa", "md", "rd", "ad", "v1", "qc"))
def fit_tensor(dwi_file, bval_file, bvec_file, mask_file, outliers_file, *, out_dir,
               b0_threshold=B0_THRESHOLD, max_bvalue=tensor.DTI_MAX_BVALUE, n_jobs=1,
               mem_gb=None):
    """DTI maps (FA, MD, RD, AD) and the principal eigenvector (voxel frame).

    Uses b0 and the shells up to ``max_bvalue`` s/mm², without excluded outliers.
    ``mem_gb``: the step's memory budget; what the series and the maps leave of it sizes
    the fit's work units (:func:`pipeline.reconstruction.tensor.tensor_chunk_voxels`; None:
    default units). The maps do not depend on it.
    Returns dict of paths: the maps, and ``qc`` (JSON: shells and volumes used).
    """
    out_dir = Path(out_dir)
    scan, data = load_scan(dwi_file, bval_file, bvec_file, b0_threshold)
    mask = load_array(mask_file, dtype=np.uint8)[0] > 0
    excluded = json.loads(Path(outliers_file).read_text())["excluded"] if outliers_file else []
    use, shells = tensor.dti_volumes(scan.bvals, b0_threshold=b0_threshold,
                                     max_bvalue=max_bvalue, excluded=excluded)
    tensor.check_tensor_directions(scan.bvals, scan.bvecs_fsl, use,
                                   b0_threshold=b0_threshold, path=dwi_file,
                                   n_excluded=len(excluded))
    working_bytes = None
    if mem_gb is not None:
        resident = data.nbytes + 7 * 4 * mask.size  # the series and the float32 maps
        working_bytes = max(int(mem_gb * 2 ** 30) - resident, 0)
    maps = tensor.fit_dti(data, scan.bvals, scan.bvecs_fsl, scan.affine, mask,
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
