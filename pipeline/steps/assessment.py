"""The last stages of a run: assessment (localisation, prognosis, QC) into the metrics
JSON, the HTML report, and the run's files written into the derivatives tree."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

import atlases

from ..clinical import prognosis
from ..cst import HEMI, SIDES
from ..io import outputs
from ..io.derivatives import DERIVATIVES, SIDECAR_FIELDS, write_roi_labels
from ..io.profiles_table import write_profile_tables
from ..stage import stage
from ..tractometry import localization, mirrored
from ..tractometry.qc import (
    DEFAULT_QC_LIMITS,
    motion_notices,
    preprocessing_notices,
    quality_control,
)
from .files import load_array


@stage(output="metrics")
def assess(profiles_json, registration_qc_file, tracking_qc_file, preprocess_qc_file,
           warped_fa_file, subject_coords_file, *, out_dir, subject, entities, input_files,
           parameters, thresholds=None,
           qc_limits=None, prep_plic_ai=prognosis.DEFAULT_PREP_PLIC_AI, clinical=None,
           prep2_thresholds=None, execution=None):
    """Localisation, prognosis, QC and provenance → the metrics JSON (public contract).

    ``warped_fa_file``, ``subject_coords_file``: the FA on the template grid and the
    scan's position of each template voxel (``register_atlas``), for the
    mirrored-asymmetry rule.
    ``clinical``: the participant's bedside scores for PREP2
    (:func:`pipeline.clinical.participants.read_clinical_scores`), recorded under ``clinical``.
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
    if assessable and loc["thresholds"]["method"] == "calibrated":
        loc = localization.with_mirrored_finding(loc, mirrored_rule(
            load_array(warped_fa_file, np.float64)[0],
            load_array(subject_coords_file, np.float64)[0], loc["thresholds"]))
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
            # Bootstrap standard errors (pipeline.tractometry.uncertainty): this scan's own
            # precision.
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
            "notices": (preprocessing_notices(pre_qc) + motion_notices(pre_qc["motion"])
                        + mirrored_notices(loc)),
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


def mirrored_notices(loc):
    """A notice when the mirrored-asymmetry test could not be applied (and why)."""
    mirror = loc.get("mirrored_asymmetry") or {}
    return ([f"The voxel-wise mirrored-asymmetry test made no statement: "
             f"{mirror['not_applicable']}; the tract-profile test alone was applied."]
            if mirror.get("not_applicable") else [])


def mirrored_rule(fa_template, subject_coords, thresholds):
    """:func:`pipeline.tractometry.mirrored.mirrored_finding` with the bundled model and
    level bands, at the rate ``thresholds["mirrored_false_positive_rate"]``."""
    levels, _ = load_array(atlases.levels_path(), np.int16)
    return mirrored.mirrored_finding(
        fa_template, subject_coords, mirrored.load_model(),
        false_positive_rate=thresholds["mirrored_false_positive_rate"],
        levels=(levels, atlases.LEVEL_LABELS))


@stage(output="html")
def make_report(metrics_json, profiles_tsv, fa_file, v1_file, left_trk, right_trk, mask_file,
                rois_file, template_mask_file, *, out_dir, n_jobs=1):
    """The run's HTML report (:func:`pipeline.report.write_report`) from its metrics JSON.

    Returns the path of ``report.html``.
    """
    from ..report import write_report

    metrics = json.loads(Path(metrics_json).read_text())
    return str(write_report(Path(out_dir) / "report.html", metrics=metrics,
                            profiles_tsv=profiles_tsv, fa_file=fa_file,
                            tract_files={"left": left_trk, "right": right_trk},
                            mask_file=mask_file, rois_file=rois_file, v1_file=v1_file,
                            template_in_subject_file=template_mask_file, n_jobs=n_jobs))


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
    (:func:`pipeline.io.outputs.save_nifti`), the ROI segmentation gets its label
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
            written.append(str(write_roi_labels(target)))
        written.append(str(outputs.write_sidecar(
            target, description=description, sources=source_files,
            spatial_reference=spatial_reference, parameters=parameters,
            extra=SIDECAR_FIELDS.get(key))))
    copy(report, Path(report_dir) / f"{stem}.html")
    copy(metrics, derivatives_dir / f"{stem}_desc-cst_metrics.json")
    return written
