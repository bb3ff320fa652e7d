"""Nipype workflows: one subject, and one diffusion run of it."""

from nipype.interfaces import utility as niu
from nipype.interfaces.base import traits
from nipype.interfaces.utility.wrappers import FunctionInputSpec
from nipype.pipeline import engine as pe

from pipeline.dwi import B0_THRESHOLD
from pipeline.preprocess import DTI_MAX_BVALUE

from . import nodes
from .execution import split_parameters


class _FunctionInputSpec(FunctionInputSpec):
    """Inputs of :class:`_Function`: the execution settings a step may take, unhashed.

    Nipype reuses a step's cached result while the hash of its inputs is
    unchanged; ``nohash`` leaves these out of it, as they do not change what the
    step computes (see :data:`workflows.execution.EXECUTION_SETTINGS`).
    """

    n_jobs = traits.Int(nohash=True, desc="workers or threads of the step")
    mem_gb = traits.Any(nohash=True, desc="memory budget of the step (GiB) or None")
    # Any, not Either(None, Str): Nipype reads ``nohash`` from the trait type, which
    # Either does not carry.
    dask_scheduler = traits.Any(nohash=True, desc="Dask scheduler address, 'slurm' or None")
    execution = traits.Dict(nohash=True, desc="the execution settings, for provenance")


#: Inputs of a step that its cached result does not depend on.
_UNHASHED_INPUTS = ("n_jobs", "mem_gb", "dask_scheduler", "execution")


class _Function(niu.Function):
    """``niu.Function`` whose inputs in :data:`_UNHASHED_INPUTS` are not hashed."""

    input_spec = _FunctionInputSpec

    def __init__(self, function, input_names, output_names):
        unhashed = [n for n in input_names if n in _UNHASHED_INPUTS]
        # Function adds a hashed trait for each name it is given; the unhashed ones are
        # declared by the spec already and only need to reach the function's arguments.
        super().__init__(function=function, output_names=output_names,
                         input_names=[n for n in input_names if n not in unhashed])
        self._input_names.extend(unhashed)


def _function_node(function, inputs, outputs, name, **kwargs):
    return pe.Node(_Function(function, inputs, outputs), name=name, **kwargs)


def init_dwi_denoise_wf(*, b0_threshold, denoise, gibbs, n_jobs, mem_gb=None,
                        name="dwi_denoise_wf"):
    """Brain mask, denoising and Gibbs-ringing removal of one run, on its own grid.

    Parameters
    ----------
    b0_threshold : float
        b-values (s/mm²) at or below this are b0.
    denoise : {"mppca", "patch2self", "none"}
    gibbs : bool
        Remove Gibbs ringing.
    n_jobs : int
        Workers for denoising and Gibbs removal.
    mem_gb : float, optional
        Memory budget (GiB) of the denoising step, which sizes its chunks from it and
        declares it to the scheduler (None: default chunks).

    Inputs
    ------
    dwi_file, bval_file, bvec_file

    Outputs
    -------
    dwi, b0, mask, denoise_qc
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["dwi", "b0", "mask", "denoise_qc"]),
                         name="outputnode")
    mask = _function_node(nodes.brain_mask, ["dwi_file", "bval_file", "bvec_file",
                                             "b0_threshold"], ["b0", "mask"], "brain_mask")
    mask.inputs.b0_threshold = b0_threshold
    noise = _function_node(nodes.denoise, ["dwi_file", "bval_file", "bvec_file", "mask_file",
                                           "method", "b0_threshold", "n_jobs",
                                           "mem_gb"], ["dwi", "qc"], "denoise", n_procs=n_jobs,
                           **({} if mem_gb is None else {"mem_gb": mem_gb}))
    noise.inputs.trait_set(method=denoise, b0_threshold=b0_threshold, n_jobs=n_jobs,
                           mem_gb=mem_gb)
    files = [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]
    wf.connect([
        (inputnode, mask, files),
        (inputnode, noise, files),
        (mask, noise, [("mask", "mask_file")]),
        (mask, outputnode, [("b0", "b0"), ("mask", "mask")]),
        (noise, outputnode, [("qc", "denoise_qc")]),
    ])
    if gibbs:
        ringing = _function_node(nodes.remove_gibbs, ["dwi_file", "mask_file", "n_jobs"],
                                 ["dwi"], "remove_gibbs", n_procs=n_jobs)
        ringing.inputs.n_jobs = n_jobs
        wf.connect([(noise, ringing, [("dwi", "dwi_file")]),
                    (mask, ringing, [("mask", "mask_file")]),
                    (ringing, outputnode, [("dwi", "dwi")])])
    else:
        wf.connect(noise, "dwi", outputnode, "dwi")
    return wf


def init_dwi_correct_wf(*, b0_threshold, motion, outliers, gradient_check, dti_max_bvalue,
                        n_jobs, name="dwi_correct_wf"):
    """Motion/eddy correction, outlier volumes, the tensor fit and the gradient check.

    Parameters
    ----------
    b0_threshold : float
        b-values (s/mm²) at or below this are b0.
    motion : {"affine", "rigid", "none"}
        Volume-to-b0 registration model ("affine" also absorbs eddy-current
        shears and scalings).
    outliers : {"exclude", "report"}
        Leave flagged volumes out of the tensor fit, or only report them.
    gradient_check : {"fix", "error", "off"}
    dti_max_bvalue : float
        Highest shell (s/mm²) the tensor fit uses.
    n_jobs : int
        Workers for motion correction.

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask, denoise_qc, combine_qc
        The denoised series, its gradients, brain mask and the QC so far;
        ``source_bvec_file``: the user's b-vector file (named in errors).

    Outputs
    -------
    fa, md, rd, ad, v1, qc (preprocessing QC JSON)
    dwi, bval, bvec, outliers_qc
        The corrected series, its gradients (b-vectors rotated and checked) and
        the outlier volumes, for fibre-ODF models.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["dwi_file", "bval_file", "bvec_file", "source_bvec_file", "mask", "denoise_qc",
                "combine_qc"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["fa", "md", "rd", "ad", "v1", "qc", "dwi", "bval", "bvec", "outliers_qc"]),
        name="outputnode")
    flag = _function_node(nodes.detect_outliers, ["dwi_file", "bval_file", "bvec_file",
                                                  "mask_file", "motion_qc", "b0_threshold",
                                                  "action"], ["qc"], "detect_outliers")
    flag.inputs.trait_set(b0_threshold=b0_threshold, action=outliers)
    check = _function_node(nodes.check_gradients, ["dwi_file", "bval_file", "bvec_file",
                                                   "mask_file", "outliers_qc", "v1_file", "mode",
                                                   "b0_threshold", "source_bvec_file"],
                           ["bvec", "v1", "qc"], "check_gradients")
    check.inputs.trait_set(mode=gradient_check, b0_threshold=b0_threshold)
    fit = _function_node(nodes.fit_tensor, ["dwi_file", "bval_file", "bvec_file", "mask_file",
                                            "outliers_qc", "b0_threshold", "max_bvalue",
                                            "n_jobs"],
                         ["fa", "md", "rd", "ad", "v1", "qc"], "fit_tensor", n_procs=n_jobs)
    fit.inputs.trait_set(b0_threshold=b0_threshold, max_bvalue=dti_max_bvalue, n_jobs=n_jobs)
    collect = _function_node(nodes.collect_preprocessing_qc,
                             ["denoise_qc", "motion_qc", "outliers_qc", "gradient_qc",
                              "tensor_qc", "combine_qc"], ["qc"], "preprocessing_qc")
    # The series and its b-vectors as they leave motion correction (or skip it).
    series, series_field, bvecs, bvec_field = inputnode, "dwi_file", inputnode, "bvec_file"
    if motion != "none":
        realign = _function_node(nodes.correct_motion, ["dwi_file", "bval_file", "bvec_file",
                                                        "mask_file", "model", "b0_threshold",
                                                        "n_jobs"], ["dwi", "bvec", "qc"],
                                 "correct_motion", n_procs=n_jobs)
        realign.inputs.trait_set(model=motion, b0_threshold=b0_threshold, n_jobs=n_jobs)
        wf.connect([(inputnode, realign, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                                          ("bvec_file", "bvec_file"), ("mask", "mask_file")]),
                    (realign, flag, [("qc", "motion_qc")]),
                    (realign, collect, [("qc", "motion_qc")])])
        series, series_field, bvecs, bvec_field = realign, "dwi", realign, "bvec"
    else:
        flag.inputs.motion_qc = None
        collect.inputs.motion_qc = None
    for node in (check, fit):
        wf.connect(series, series_field, node, "dwi_file")
    for node in (flag, check, fit):
        wf.connect(inputnode, "bval_file", node, "bval_file")
        wf.connect(inputnode, "mask", node, "mask_file")
    wf.connect([
        # Dropout is judged on the slices as acquired: resampling by the motion correction
        # mixes slices, and empties an end slice of volumes that moved along the slice axis.
        (inputnode, flag, [("dwi_file", "dwi_file"), ("bvec_file", "bvec_file")]),
        # The tensor is fitted with the table as given: a flip or permutation of the table
        # changes only its principal direction, which the check turns (see
        # pipeline.steps.check_gradients). So FA, and the template registration that
        # needs only FA, do not wait for the check: it runs beside the registration.
        (bvecs, fit, [(bvec_field, "bvec_file")]),
        (flag, fit, [("qc", "outliers_qc")]),
        (bvecs, check, [(bvec_field, "bvec_file")]),
        (inputnode, check, [("source_bvec_file", "source_bvec_file")]),
        (flag, check, [("qc", "outliers_qc")]),
        (fit, check, [("v1", "v1_file")]),
        (inputnode, collect, [("denoise_qc", "denoise_qc"), ("combine_qc", "combine_qc")]),
        (flag, collect, [("qc", "outliers_qc")]),
        (check, collect, [("qc", "gradient_qc")]),
        (fit, collect, [("qc", "tensor_qc")]),
        (fit, outputnode, [("fa", "fa"), ("md", "md"), ("rd", "rd"), ("ad", "ad")]),
        (check, outputnode, [("v1", "v1")]),
        (collect, outputnode, [("qc", "qc")]),
        (series, outputnode, [(series_field, "dwi")]),
        (inputnode, outputnode, [("bval_file", "bval")]),
        (check, outputnode, [("bvec", "bvec")]),
        (flag, outputnode, [("qc", "outliers_qc")]),
    ])
    return wf


def init_dwi_preproc_wf(runs, *, parameters, mem_gb=None, name="dwi_preproc_wf"):
    """From the raw series of one run (or several combined runs) to the tensor maps.

    Per run: brain mask → denoising → Gibbs removal; several runs are then
    aligned to the first and concatenated (``pipeline.combine``); then motion/
    eddy correction with b-vector rotation → outlier volumes → tensor fit →
    gradient-table check (beside the registration: it turns only the principal
    direction).

    Parameters
    ----------
    runs : list of pipeline.bids.DwiRun
        One run, or the runs to combine (the first is the reference).
    parameters : dict
        The run configuration (``preprocessing`` section and ``n_jobs``).
    mem_gb : float, optional
        The run's memory budget (GiB) for the denoising steps (None: default chunks).

    Outputs
    -------
    mask, fa, md, rd, ad, v1, qc (preprocessing QC JSON), dwi, bval, bvec, outliers_qc
    """
    pre, n_jobs = parameters["preprocessing"], parameters["n_jobs"]
    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["mask", "fa", "md", "rd", "ad", "v1", "qc", "dwi", "bval", "bvec",
                "outliers_qc"]), name="outputnode")
    correct_wf = init_dwi_correct_wf(
        b0_threshold=pre["b0_threshold"], motion=pre["motion"], outliers=pre["outliers"],
        gradient_check=pre["gradient_check"], dti_max_bvalue=pre["dti_max_bvalue"],
        n_jobs=n_jobs)
    denoise_wfs = []
    for index, run in enumerate(runs):
        denoise_wf = init_dwi_denoise_wf(b0_threshold=pre["b0_threshold"],
                                         denoise=pre["denoise"], gibbs=pre["gibbs"],
                                         n_jobs=n_jobs, mem_gb=mem_gb,
                                         name=f"dwi_denoise_wf_{index}")
        denoise_wf.inputs.inputnode.dwi_file = str(run.dwi)
        denoise_wf.inputs.inputnode.bval_file = str(run.bval)
        denoise_wf.inputs.inputnode.bvec_file = str(run.bvec)
        denoise_wfs.append(denoise_wf)
    # Errors about the b-vectors name the reference run's file.
    correct_wf.inputs.inputnode.source_bvec_file = str(runs[0].bvec)
    if len(runs) == 1:
        correct_wf.inputs.inputnode.trait_set(bval_file=str(runs[0].bval),
                                              bvec_file=str(runs[0].bvec), combine_qc=None)
        wf.connect([(denoise_wfs[0], correct_wf, [
            ("outputnode.dwi", "inputnode.dwi_file"), ("outputnode.mask", "inputnode.mask"),
            ("outputnode.denoise_qc", "inputnode.denoise_qc")]),
            (denoise_wfs[0], outputnode, [("outputnode.mask", "mask")])])
    else:
        join = _function_node(nodes.combine_runs, ["dwi_files", "bval_files", "bvec_files",
                                                   "mask_files", "denoise_qc_files",
                                                   "b0_threshold"],
                              ["dwi", "bval", "bvec", "mask", "denoise_qc", "qc"], "combine_runs")
        join.inputs.trait_set(bval_files=[str(r.bval) for r in runs],
                              bvec_files=[str(r.bvec) for r in runs],
                              b0_threshold=pre["b0_threshold"])
        for field in ("dwi", "mask", "denoise_qc"):
            merge = pe.Node(niu.Merge(len(runs)), name=f"merge_{field}")
            for index, denoise_wf in enumerate(denoise_wfs):
                wf.connect(denoise_wf, f"outputnode.{field}", merge, f"in{index + 1}")
            wf.connect(merge, "out", join, f"{field}_files" if field != "denoise_qc"
                       else "denoise_qc_files")
        wf.connect([(join, correct_wf, [("dwi", "inputnode.dwi_file"),
                                        ("bval", "inputnode.bval_file"),
                                        ("bvec", "inputnode.bvec_file"),
                                        ("mask", "inputnode.mask"),
                                        ("denoise_qc", "inputnode.denoise_qc"),
                                        ("qc", "inputnode.combine_qc")]),
                    (join, outputnode, [("mask", "mask")])])
    wf.connect([(correct_wf, outputnode, [
        (f"outputnode.{k}", k)
        for k in ("fa", "md", "rd", "ad", "v1", "qc", "dwi", "bval", "bvec", "outliers_qc")])])
    return wf


def init_cst_wf(*, subject, tracking, n_jobs, seed, dask_scheduler=None, b0_threshold=B0_THRESHOLD,
                dti_max_bvalue=DTI_MAX_BVALUE, name="cst_wf"):
    """Template registration, the tracking model, CST tracking and 100-node tract profiles.

    Parameters
    ----------
    subject : str
        Subject label (written in the profiles table).
    tracking : dict
        ``model`` ("dti", "csd" or "auto"; :func:`pipeline.steps.fit_fodf`) and
        keyword arguments of :func:`pipeline.steps.track_cst` (direction, fa_stop,
        gap_fa, corridor_radius_mm, max_angle_deg, step_mm, seeds_per_voxel,
        min_coverage).
    n_jobs : int
        joblib workers for tracking, threads for SyN's field inversions (neither
        result depends on it).
    seed : int
        Random seed of seed placement and of the profiles' bootstrap.
    dask_scheduler : str, optional
        Track on this Dask cluster (scheduler address, or ``"slurm"`` for a
        dask-jobqueue SLURMCluster of ``n_jobs`` workers) instead of locally.

    b0_threshold : float
        b-values (s/mm²) at or below this are b0 (for the CSD fit and the bootstrap).
    dti_max_bvalue : float
        The tensor's highest shell (s/mm²), for the bootstrap of the tensor fit.

    Inputs
    ------
    fa, md, rd, ad, v1, mask, and dwi, bval, bvec, outliers_qc (for CSD and the
    profiles' bootstrap)

    Outputs
    -------
    rois, mni_z, template_mask, registration_qc, left, right, tracking_qc, fodf_qc,
    profiles_tsv, profiles_json
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["fa", "md", "rd", "ad", "v1", "mask", "dwi", "bval", "bvec", "outliers_qc"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["rois", "mni_z", "template_mask", "registration_qc", "left", "right",
                "tracking_qc", "fodf_qc", "profiles_tsv", "profiles_json"]), name="outputnode")
    # One process slot: its second thread runs only SyN's field inversions, a fifth of its
    # time, so the other core stays with the gradient check, which runs beside it.
    register = _function_node(nodes.register_atlas, ["fa_file", "mask_file", "n_jobs"],
                              ["rois", "mni_z", "template_mask", "qc"],
                              "register_atlas")
    register.inputs.n_jobs = n_jobs
    fodf = _function_node(
        nodes.fit_fodf, ["dwi_file", "bval_file", "bvec_file", "mask_file", "fa_file",
                         "md_file", "rois_file", "outliers_qc", "model", "fa_stop", "b0_threshold",
                         "n_jobs"], ["sh", "qc"], "fit_fodf", n_procs=n_jobs)
    fodf.inputs.trait_set(model=tracking.get("model", "dti"),
                          fa_stop=tracking.get("fa_stop", 0.2), b0_threshold=b0_threshold,
                          n_jobs=n_jobs)
    track = _function_node(
        nodes.track_cst, ["fa_file", "v1_file", "mask_file", "rois_file", "registration_qc",
                          "mni_z_file", "sh_file", "fodf_qc", "tracking", "n_jobs", "seed",
                          "dask_scheduler"],
        ["left", "right", "qc"],
        "track_cst", n_procs=1 if dask_scheduler else n_jobs)  # Dask workers do the tracking
    track.inputs.tracking = {k: v for k, v in tracking.items() if k != "model"}
    track.inputs.n_jobs = n_jobs
    track.inputs.seed = seed
    track.inputs.dask_scheduler = dask_scheduler
    profiles = _function_node(
        nodes.tract_profiles, ["left_trk", "right_trk", "fa_file", "md_file", "rd_file",
                               "ad_file", "mni_z_file", "rois_file", "dwi_file", "bval_file",
                               "bvec_file", "outliers_qc", "subject", "b0_threshold",
                               "max_bvalue", "seed"],
        ["tsv", "json"], "tract_profiles")
    profiles.inputs.trait_set(subject=subject, b0_threshold=b0_threshold,
                              max_bvalue=dti_max_bvalue, seed=seed)
    wf.connect([
        (inputnode, register, [("fa", "fa_file"), ("mask", "mask_file")]),
        (inputnode, track, [("fa", "fa_file"), ("v1", "v1_file"), ("mask", "mask_file")]),
        (register, track, [("rois", "rois_file"), ("qc", "registration_qc"),
                           ("mni_z", "mni_z_file")]),
        (inputnode, fodf, [("dwi", "dwi_file"), ("bval", "bval_file"), ("bvec", "bvec_file"),
                           ("mask", "mask_file"), ("fa", "fa_file"), ("md", "md_file"),
                           ("outliers_qc", "outliers_qc")]),
        (register, fodf, [("rois", "rois_file")]),
        (fodf, track, [("sh", "sh_file"), ("qc", "fodf_qc")]),
        (fodf, outputnode, [("qc", "fodf_qc")]),
        (inputnode, profiles, [("fa", "fa_file"), ("md", "md_file"), ("rd", "rd_file"),
                               ("ad", "ad_file"), ("dwi", "dwi_file"), ("bval", "bval_file"),
                               ("bvec", "bvec_file"), ("outliers_qc", "outliers_qc")]),
        (register, profiles, [("mni_z", "mni_z_file"), ("rois", "rois_file")]),
        (track, profiles, [("left", "left_trk"), ("right", "right_trk")]),
        (register, outputnode, [("rois", "rois"), ("mni_z", "mni_z"),
                                ("template_mask", "template_mask"), ("qc", "registration_qc")]),
        (track, outputnode, [("left", "left"), ("right", "right"), ("qc", "tracking_qc")]),
        (profiles, outputnode, [("tsv", "profiles_tsv"), ("json", "profiles_json")]),
    ])
    return wf


def init_dwi_run_wf(run, *, out_dir, parameters, clinical=None, mem_gb=None, name=None):
    """Everything for one diffusion run, from the BIDS files to its derivatives and report.

    Parameters
    ----------
    run : pipeline.bids.DwiRun
    out_dir : path
        Root of the BIDS-Derivatives output.
    parameters : dict
        The run configuration (see :func:`workflows.cli.build_parameters`); it
        is recorded in every output's provenance.
    clinical : dict, optional
        The participant's bedside scores for PREP2
        (:func:`pipeline.clinical.read_clinical_scores`).
    mem_gb : float, optional
        The memory budget (GiB) the run resolved for itself (not recorded: it depends on
        the machine, not on the results).
    name : str
        Defaults to ``<stem>_wf``.

    Outputs
    -------
    written : list of the derivative files
    """
    wf = pe.Workflow(name=name or f"{run.stem.replace('-', '_')}_wf")
    preproc_wf = init_dwi_preproc_wf(list(getattr(run, "runs", [run])), parameters=parameters,
                                     mem_gb=mem_gb)
    cst_wf = init_cst_wf(subject=run.subject, tracking=parameters["tracking"],
                         n_jobs=parameters["n_jobs"],
                         seed=parameters["seed"],
                         dask_scheduler=parameters.get("dask_scheduler"),
                         b0_threshold=parameters["preprocessing"]["b0_threshold"],
                         dti_max_bvalue=parameters["preprocessing"]["dti_max_bvalue"])

    assess = _function_node(
        nodes.assess, ["profiles_json", "registration_qc", "tracking_qc", "preprocess_qc",
                       "subject", "entities", "input_files", "parameters", "execution",
                       "clinical"],
        ["metrics"], "assess")
    source_files = [str(path) for path in run.source_files]
    assess.inputs.subject = run.subject
    assess.inputs.entities = dict(run.entities)
    assess.inputs.input_files = source_files
    # Only the settings that decide the results may invalidate the cached assessment.
    assess.inputs.parameters, assess.inputs.execution = split_parameters(parameters)
    assess.inputs.clinical = clinical

    report = _function_node(
        nodes.report, ["metrics_json", "profiles_tsv", "fa_file", "v1_file", "left_trk",
                       "right_trk", "mask_file", "rois_file", "template_mask_file", "n_jobs"],
        ["html"], "report", n_procs=parameters["n_jobs"])
    report.inputs.n_jobs = parameters["n_jobs"]

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
                              ("outputnode.mask", "inputnode.mask"),
                              ("outputnode.dwi", "inputnode.dwi"),
                              ("outputnode.bval", "inputnode.bval"),
                              ("outputnode.bvec", "inputnode.bvec"),
                              ("outputnode.outliers_qc", "inputnode.outliers_qc")]),
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


def init_single_subject_wf(runs, *, out_dir, work_dir, parameters, clinical=None,
                           mem_gb=None, name="single_subject_wf"):
    """One subject: each run (or each set of combined runs) processed and reported.

    Parameters
    ----------
    runs : list of pipeline.bids.DwiRun or pipeline.bids.CombinedRuns
    out_dir, work_dir : path
    parameters : dict
    clinical : dict, optional
        The participant's bedside scores (PREP2), from ``participants.tsv``.
    mem_gb : float, optional
        The run's memory budget (GiB), see :func:`init_dwi_run_wf`.
    """
    wf = pe.Workflow(name=f"{name}_{runs[0].subject}", base_dir=str(work_dir))
    wf.add_nodes([init_dwi_run_wf(run, out_dir=out_dir, parameters=parameters,
                                  clinical=clinical, mem_gb=mem_gb) for run in runs])
    return wf
