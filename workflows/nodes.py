"""Functions run inside Nipype ``Function`` nodes.

Nipype ships a function to its worker as source text, so each one imports
what it needs inside its body and writes into the node's own folder (the
current directory). All the science is in ``pipeline.steps``.
"""


def preprocess(dwi_file, bval_file, bvec_file, b0_threshold, denoise, n_jobs):
    import os

    from pipeline.steps import preprocess_dwi

    out = preprocess_dwi(dwi_file, bval_file, bvec_file, out_dir=os.getcwd(),
                         b0_threshold=b0_threshold, denoise=denoise, n_jobs=n_jobs)
    return out["b0"], out["mask"], out["dwi"], out["qc"]


def fit_tensor(dwi_file, bval_file, bvec_file, mask_file, b0_threshold):
    import os

    from pipeline.steps import fit_tensor as fit

    out = fit(dwi_file, bval_file, bvec_file, mask_file, out_dir=os.getcwd(),
              b0_threshold=b0_threshold)
    return out["fa"], out["md"], out["rd"], out["ad"], out["v1"]


def register_atlas(fa_file, mask_file):
    import os

    from pipeline.steps import register_atlas as register

    out = register(fa_file, mask_file, out_dir=os.getcwd())
    return out["rois"], out["levels"], out["template_mask"], out["qc"]


def track_cst(fa_file, v1_file, mask_file, rois_file, registration_qc, tracking, n_jobs, seed):
    import os

    from pipeline.steps import track_cst as track

    out = track(fa_file, v1_file, mask_file, rois_file, registration_qc, out_dir=os.getcwd(),
                n_jobs=n_jobs, seed=seed, **tracking)
    return out["left"], out["right"], out["qc"]


def tract_profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, levels_file,
                   rois_file, subject):
    import os

    from pipeline.steps import tract_profiles as profiles

    out = profiles(left_trk, right_trk, fa_file, md_file, rd_file, ad_file, levels_file,
                   rois_file, out_dir=os.getcwd(), subject=subject)
    return out["tsv"], out["json"]


def assess(profiles_json, registration_qc, tracking_qc, preprocess_qc, subject, entities,
           input_files, parameters):
    import os

    from pipeline.steps import assess as run_assessment

    return run_assessment(profiles_json, registration_qc, tracking_qc, preprocess_qc,
                          out_dir=os.getcwd(), subject=subject, entities=entities,
                          input_files=input_files, parameters=parameters,
                          thresholds=parameters["localization"], qc_limits=parameters["qc"],
                          prep_plic_ai=parameters["prognosis"]["prep_plic_ai"])


def report(metrics_json, profiles_tsv, fa_file, v1_file, left_trk, right_trk, mask_file,
           rois_file, template_mask_file):
    import json
    import os

    from pipeline.report import write_report

    metrics = json.loads(open(metrics_json).read())
    return str(write_report(os.path.join(os.getcwd(), "report.html"), metrics=metrics,
                            profiles_tsv=profiles_tsv, fa_file=fa_file,
                            tract_files={"left": left_trk, "right": right_trk},
                            mask_file=mask_file, rois_file=rois_file, v1_file=v1_file,
                            template_in_subject_file=template_mask_file))


def collect_outputs(fa, md, rd, ad, mask, rois, left, right, profiles_tsv, metrics, report):
    return {"fa": fa, "md": md, "rd": rd, "ad": ad, "mask": mask, "rois": rois, "left": left,
            "right": right, "profiles_tsv": profiles_tsv, "metrics": metrics, "report": report}


def write_derivatives(out_dir, stem, derivatives_dir, source_files, parameters, files):
    from pipeline.steps import write_derivatives as write

    return write(files, out_dir=out_dir, stem=stem, derivatives_dir=derivatives_dir,
                 source_files=source_files, parameters=parameters)
