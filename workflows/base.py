"""Nipype workflows: one subject, and one diffusion run of it."""

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from . import nodes


def _function_node(function, inputs, outputs, name, **kwargs):
    return pe.Node(niu.Function(input_names=inputs, output_names=outputs, function=function),
                   name=name, **kwargs)


def init_dwi_preproc_wf(*, b0_threshold, denoise, n_jobs, name="dwi_preproc_wf"):
    """Mean b0, brain mask, denoising and the tensor fit.

    Gibbs removal, motion/eddy correction and the gradient check slot in
    between ``preprocess`` and ``fit_tensor``.

    Parameters
    ----------
    b0_threshold : float
        b-values (s/mm²) at or below this are b0.
    denoise : {"mppca", "patch2self", "none"}
    n_jobs : int
        Workers for denoising.

    Inputs
    ------
    dwi_file, bval_file, bvec_file

    Outputs
    -------
    b0, mask, fa, md, rd, ad, v1, qc
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["b0", "mask", "fa", "md", "rd", "ad", "v1", "qc"]), name="outputnode")
    preprocess = _function_node(
        nodes.preprocess, ["dwi_file", "bval_file", "bvec_file", "b0_threshold", "denoise",
                           "n_jobs"], ["b0", "mask", "dwi", "qc"], "preprocess",
        n_procs=n_jobs)
    preprocess.inputs.b0_threshold = b0_threshold
    preprocess.inputs.denoise = denoise
    preprocess.inputs.n_jobs = n_jobs
    fit = _function_node(nodes.fit_tensor, ["dwi_file", "bval_file", "bvec_file", "mask_file",
                                            "b0_threshold"],
                         ["fa", "md", "rd", "ad", "v1"], "fit_tensor")
    fit.inputs.b0_threshold = b0_threshold
    wf.connect([
        (inputnode, preprocess, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                                 ("bvec_file", "bvec_file")]),
        (inputnode, fit, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (preprocess, fit, [("dwi", "dwi_file"), ("mask", "mask_file")]),
        (preprocess, outputnode, [("b0", "b0"), ("mask", "mask"), ("qc", "qc")]),
        (fit, outputnode, [("fa", "fa"), ("md", "md"), ("rd", "rd"), ("ad", "ad"),
                           ("v1", "v1")]),
    ])
    return wf


def init_cst_wf(*, subject, tracking, n_jobs, seed, name="cst_wf"):
    """Template registration, CST tracking and 100-node tract profiles.

    Parameters
    ----------
    subject : str
        Subject label (written in the profiles table).
    tracking : dict
        Keyword arguments of :func:`pipeline.steps.track_cst` (fa_stop,
        max_angle_deg, step_mm, seeds_per_voxel, min_coverage).
    n_jobs : int
        joblib workers for tracking (the streamlines do not depend on it).
    seed : int
        Random seed of seed placement.

    Inputs
    ------
    fa, md, rd, ad, v1, mask

    Outputs
    -------
    rois, levels, template_mask, registration_qc, left, right, tracking_qc, profiles_tsv,
    profiles_json
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["fa", "md", "rd", "ad", "v1", "mask"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["rois", "levels", "template_mask", "registration_qc", "left", "right",
                "tracking_qc", "profiles_tsv", "profiles_json"]), name="outputnode")
    register = _function_node(nodes.register_atlas, ["fa_file", "mask_file"],
                              ["rois", "levels", "template_mask", "qc"], "register_atlas")
    track = _function_node(
        nodes.track_cst, ["fa_file", "v1_file", "mask_file", "rois_file", "registration_qc",
                          "tracking", "n_jobs", "seed"], ["left", "right", "qc"], "track_cst",
        n_procs=n_jobs)
    track.inputs.tracking = tracking
    track.inputs.n_jobs = n_jobs
    track.inputs.seed = seed
    profiles = _function_node(
        nodes.tract_profiles, ["left_trk", "right_trk", "fa_file", "md_file", "rd_file",
                               "ad_file", "levels_file", "rois_file", "subject"],
        ["tsv", "json"], "tract_profiles")
    profiles.inputs.subject = subject
    wf.connect([
        (inputnode, register, [("fa", "fa_file"), ("mask", "mask_file")]),
        (inputnode, track, [("fa", "fa_file"), ("v1", "v1_file"), ("mask", "mask_file")]),
        (register, track, [("rois", "rois_file"), ("qc", "registration_qc")]),
        (inputnode, profiles, [("fa", "fa_file"), ("md", "md_file"), ("rd", "rd_file"),
                               ("ad", "ad_file")]),
        (register, profiles, [("levels", "levels_file"), ("rois", "rois_file")]),
        (track, profiles, [("left", "left_trk"), ("right", "right_trk")]),
        (register, outputnode, [("rois", "rois"), ("levels", "levels"),
                                ("template_mask", "template_mask"), ("qc", "registration_qc")]),
        (track, outputnode, [("left", "left"), ("right", "right"), ("qc", "tracking_qc")]),
        (profiles, outputnode, [("tsv", "profiles_tsv"), ("json", "profiles_json")]),
    ])
    return wf


def init_dwi_run_wf(run, *, out_dir, parameters, name=None):
    """Everything for one diffusion run, from the BIDS files to its derivatives and report.

    Parameters
    ----------
    run : pipeline.bids.DwiRun
    out_dir : path
        Root of the BIDS-Derivatives output.
    parameters : dict
        The run configuration (see ``workflows.config.default_parameters``); it
        is recorded in every output's provenance.
    name : str
        Defaults to ``<stem>_wf``.

    Outputs
    -------
    written : list of the derivative files
    """
    wf = pe.Workflow(name=name or f"{run.stem.replace('-', '_')}_wf")
    pre = parameters["preprocessing"]
    preproc_wf = init_dwi_preproc_wf(b0_threshold=pre["b0_threshold"], denoise=pre["denoise"],
                                     n_jobs=parameters["n_jobs"])
    preproc_wf.inputs.inputnode.dwi_file = str(run.dwi)
    preproc_wf.inputs.inputnode.bval_file = str(run.bval)
    preproc_wf.inputs.inputnode.bvec_file = str(run.bvec)
    cst_wf = init_cst_wf(subject=run.subject, tracking=parameters["tracking"],
                         n_jobs=parameters["n_jobs"],
                         seed=parameters["seed"])

    assess = _function_node(
        nodes.assess, ["profiles_json", "registration_qc", "tracking_qc", "preprocess_qc",
                       "subject", "entities", "input_files", "parameters"], ["metrics"],
        "assess")
    source_files = [str(run.dwi), str(run.bval), str(run.bvec)]
    assess.inputs.subject = run.subject
    assess.inputs.entities = dict(run.entities)
    assess.inputs.input_files = source_files
    assess.inputs.parameters = parameters

    report = _function_node(
        nodes.report, ["metrics_json", "profiles_tsv", "fa_file", "v1_file", "left_trk",
                       "right_trk", "mask_file", "rois_file", "template_mask_file"], ["html"],
        "report")

    to_dict = _function_node(nodes.collect_outputs, ["fa", "md", "rd", "ad", "mask", "rois", "left",
                                           "right", "profiles_tsv", "metrics", "report"],
                             ["files"], "files_dict")
    write = _function_node(
        nodes.write_derivatives, ["out_dir", "stem", "derivatives_dir", "source_files",
                                  "parameters", "files"], ["written"], "write_derivatives",
        overwrite=True)
    write.inputs.out_dir = str(out_dir)
    write.inputs.stem = run.stem
    write.inputs.derivatives_dir = str(run.derivatives_dir(out_dir))
    write.inputs.source_files = source_files
    write.inputs.parameters = parameters

    wf.connect([
        (preproc_wf, cst_wf, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                              ("outputnode.rd", "inputnode.rd"), ("outputnode.ad", "inputnode.ad"),
                              ("outputnode.v1", "inputnode.v1"),
                              ("outputnode.mask", "inputnode.mask")]),
        (cst_wf, assess, [("outputnode.profiles_json", "profiles_json"),
                          ("outputnode.registration_qc", "registration_qc"),
                          ("outputnode.tracking_qc", "tracking_qc")]),
        (preproc_wf, assess, [("outputnode.qc", "preprocess_qc")]),
        (assess, report, [("metrics", "metrics_json")]),
        (cst_wf, report, [("outputnode.profiles_tsv", "profiles_tsv"),
                          ("outputnode.left", "left_trk"), ("outputnode.right", "right_trk"),
                          ("outputnode.rois", "rois_file"),
                          ("outputnode.template_mask", "template_mask_file")]),
        (preproc_wf, report, [("outputnode.fa", "fa_file"), ("outputnode.v1", "v1_file"),
                              ("outputnode.mask", "mask_file")]),
        (preproc_wf, to_dict, [("outputnode.fa", "fa"), ("outputnode.md", "md"),
                               ("outputnode.rd", "rd"), ("outputnode.ad", "ad"),
                               ("outputnode.mask", "mask")]),
        (cst_wf, to_dict, [("outputnode.rois", "rois"), ("outputnode.left", "left"),
                           ("outputnode.right", "right"),
                           ("outputnode.profiles_tsv", "profiles_tsv")]),
        (assess, to_dict, [("metrics", "metrics")]),
        (report, to_dict, [("html", "report")]),
        (to_dict, write, [("files", "files")]),
    ])
    return wf


def init_single_subject_wf(runs, *, out_dir, work_dir, parameters, name="single_subject_wf"):
    """One subject: every diffusion run processed and reported separately.

    Parameters
    ----------
    runs : list of pipeline.bids.DwiRun
    out_dir, work_dir : path
    parameters : dict
    """
    wf = pe.Workflow(name=f"{name}_{runs[0].subject}", base_dir=str(work_dir))
    wf.add_nodes([init_dwi_run_wf(run, out_dir=out_dir, parameters=parameters) for run in runs])
    return wf
