"""Functions run inside Nipype ``Function`` nodes.

Nipype ships a function to its worker as source text, so each one imports
what it needs inside its body and writes into the node's own folder (the
current directory). All the science is in ``pipeline.steps``.

Arguments named ``n_jobs``, ``dask_scheduler`` and ``execution`` are left out
of Nipype's cache key (``workflows.base._Function``): a result never depends
on them.
"""


def brain_mask(dwi_file, bval_file, bvec_file, b0_threshold):
    import os

    from pipeline.steps import brain_mask as make_mask

    out = make_mask(dwi_file, bval_file, bvec_file, out_dir=os.getcwd(),
                    b0_threshold=b0_threshold)
    return out["b0"], out["mask"]


def denoise(dwi_file, bval_file, bvec_file, mask_file, method, b0_threshold, n_jobs, mem_gb):
    import os

    from pipeline.steps import denoise as run_denoise

    out = run_denoise(dwi_file, bval_file, bvec_file, mask_file, out_dir=os.getcwd(),
                      method=method, b0_threshold=b0_threshold, n_jobs=n_jobs,
                      memory_gb=mem_gb)
    return out["dwi"], out["qc"]


def remove_gibbs(dwi_file, mask_file, n_jobs):
    import os

    from pipeline.steps import remove_gibbs as run_gibbs

    return run_gibbs(dwi_file, mask_file, out_dir=os.getcwd(), n_jobs=n_jobs)["dwi"]


def combine_runs(dwi_files, bval_files, bvec_files, mask_files, denoise_qc_files, b0_threshold):
    import os

    from pipeline.steps import combine_runs as combine

    out = combine(dwi_files, bval_files, bvec_files, mask_files, denoise_qc_files,
                  out_dir=os.getcwd(), b0_threshold=b0_threshold)
    return out["dwi"], out["bval"], out["bvec"], out["mask"], out["denoise_qc"], out["qc"]


def correct_motion(dwi_file, bval_file, bvec_file, mask_file, model, b0_threshold, n_jobs):
    import os

    from pipeline.steps import correct_motion as run_motion

    out = run_motion(dwi_file, bval_file, bvec_file, mask_file, out_dir=os.getcwd(),
                     model=model, b0_threshold=b0_threshold, n_jobs=n_jobs)
    return out["dwi"], out["bvec"], out["qc"]


def detect_outliers(dwi_file, bval_file, bvec_file, mask_file, motion_qc, b0_threshold, action):
    import os

    from pipeline.steps import detect_outliers as run_outliers

    return run_outliers(dwi_file, bval_file, bvec_file, mask_file, motion_qc,
                        out_dir=os.getcwd(), b0_threshold=b0_threshold, action=action)["qc"]


def check_gradients(dwi_file, bval_file, bvec_file, mask_file, outliers_qc, v1_file, mode,
                    b0_threshold, source_bvec_file):
    import os

    from pipeline.steps import check_gradients as run_check

    out = run_check(dwi_file, bval_file, bvec_file, mask_file, outliers_qc, v1_file,
                    out_dir=os.getcwd(), mode=mode, b0_threshold=b0_threshold,
                    source_bvec_file=source_bvec_file)
    return out["bvec"], out["v1"], out["qc"]


def fit_tensor(dwi_file, bval_file, bvec_file, mask_file, outliers_qc, b0_threshold,
               max_bvalue, n_jobs):
    import os

    from pipeline.steps import fit_tensor as fit

    out = fit(dwi_file, bval_file, bvec_file, mask_file, outliers_qc, out_dir=os.getcwd(),
              b0_threshold=b0_threshold, max_bvalue=max_bvalue, n_jobs=n_jobs)
    return out["fa"], out["md"], out["rd"], out["ad"], out["v1"], out["qc"]


def collect_preprocessing_qc(denoise_qc, motion_qc, outliers_qc, gradient_qc, tensor_qc,
                             combine_qc):
    import os

    from pipeline.steps import collect_preprocessing_qc as collect

    return collect(out_dir=os.getcwd(), denoise_qc=denoise_qc, motion_qc=motion_qc,
                   outliers_qc=outliers_qc, gradient_qc=gradient_qc, tensor_qc=tensor_qc,
                   combine_qc=combine_qc)


def register_atlas(fa_file, mask_file, n_jobs):
    import os

    from pipeline.steps import register_atlas as register

    out = register(fa_file, mask_file, out_dir=os.getcwd(), n_jobs=n_jobs)
    return out["rois"], out["mni_z"], out["template_mask"], out["qc"]


def fit_fodf(dwi_file, bval_file, bvec_file, mask_file, fa_file, md_file, rois_file, outliers_qc,
             model, fa_stop, b0_threshold, n_jobs):
    import os

    from pipeline.steps import fit_fodf as fit

    out = fit(dwi_file, bval_file, bvec_file, mask_file, fa_file, rois_file, outliers_qc,
              out_dir=os.getcwd(), model=model, fa_stop=fa_stop, b0_threshold=b0_threshold,
              n_jobs=n_jobs, md_file=md_file)
    return out["sh"], out["qc"]


def track_cst(fa_file, v1_file, mask_file, rois_file, registration_qc, mni_z_file, sh_file,
              fodf_qc, tracking, n_jobs, seed, dask_scheduler=None):
    import os

    from pipeline.steps import track_cst as track

    out = track(fa_file, v1_file, mask_file, rois_file, registration_qc, mni_z_file,
                out_dir=os.getcwd(), sh_file=sh_file, fodf_qc_file=fodf_qc, n_jobs=n_jobs,
                seed=seed, dask_scheduler=dask_scheduler, **tracking)
    return out["left"], out["right"], out["qc"]


def tract_profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, mni_z_file,
                   rois_file, dwi_file, bval_file, bvec_file, outliers_qc, subject, b0_threshold,
                   max_bvalue, seed):
    import os

    from pipeline.steps import tract_profiles as profiles

    out = profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, mni_z_file,
                   rois_file, dwi_file, bval_file, bvec_file, outliers_qc, out_dir=os.getcwd(),
                   subject=subject, b0_threshold=b0_threshold, max_bvalue=max_bvalue, seed=seed)
    return out["tsv"], out["json"]


def assess(profiles_json, registration_qc, tracking_qc, preprocess_qc, subject, entities,
           input_files, parameters, execution, clinical):
    """``execution``: the settings that do not change results, recorded beside ``parameters``
    in the provenance (those of the run that made the assessment)."""
    import os

    from pipeline.steps import assess as run_assessment

    prognosis = dict(parameters["prognosis"])
    return run_assessment(profiles_json, registration_qc, tracking_qc, preprocess_qc,
                          out_dir=os.getcwd(), subject=subject, entities=entities,
                          input_files=input_files, parameters={**execution, **parameters},
                          thresholds=parameters["localization"], qc_limits=parameters["qc"],
                          prep_plic_ai=prognosis.pop("prep_plic_ai"), clinical=clinical,
                          prep2_thresholds=prognosis)


def report(metrics_json, profiles_tsv, fa_file, v1_file, left_trk, right_trk, mask_file,
           rois_file, template_mask_file, n_jobs):
    import json
    import os

    from pipeline.report import write_report

    metrics = json.loads(open(metrics_json).read())
    return str(write_report(os.path.join(os.getcwd(), "report.html"), metrics=metrics,
                            profiles_tsv=profiles_tsv, fa_file=fa_file,
                            tract_files={"left": left_trk, "right": right_trk},
                            mask_file=mask_file, rois_file=rois_file, v1_file=v1_file,
                            template_in_subject_file=template_mask_file, n_jobs=n_jobs))


def collect_outputs(fa, md, rd, ad, mask, rois, left, right, profiles_tsv, metrics, report):
    return {"fa": fa, "md": md, "rd": rd, "ad": ad, "mask": mask, "rois": rois, "left": left,
            "right": right, "profiles_tsv": profiles_tsv, "metrics": metrics, "report": report}


def write_derivatives(out_dir, stem, derivatives_dir, source_files, parameters, files):
    from pipeline.steps import write_derivatives as write

    return write(files, out_dir=out_dir, stem=stem, derivatives_dir=derivatives_dir,
                 source_files=source_files, parameters=parameters)
