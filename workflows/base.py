"""Nipype workflows: one subject, and one diffusion run of it."""

import inspect

from nipype.interfaces import utility as niu
from nipype.interfaces.base import traits
from nipype.interfaces.utility.wrappers import FunctionInputSpec
from nipype.pipeline import engine as pe

from pipeline import steps
from pipeline.io.dwi import B0_THRESHOLD
from pipeline.memory import steps_mem_gb
from pipeline.reconstruction.tensor import DTI_MAX_BVALUE

from .execution import EXECUTION_SETTINGS, split_parameters

#: Inputs of a stage that its cached result does not depend on: the execution settings, and
#: ``execution`` (all of them, recorded in the provenance).
UNHASHED_INPUTS = (*EXECUTION_SETTINGS, "execution")


class _StageInputSpec(FunctionInputSpec):
    """Inputs of :class:`StageInterface`: the stage, and the execution settings it may take,
    unhashed.

    Nipype reuses a step's cached result while the hash of its inputs is
    unchanged; ``nohash`` leaves these out of it, as they do not change what the
    step computes (see :data:`workflows.execution.EXECUTION_SETTINGS`).
    """

    stage = traits.Str(mandatory=True, desc="the stage run, 'module:function'")
    n_jobs = traits.Int(nohash=True, desc="workers or threads of the step")
    mem_gb = traits.Any(nohash=True, desc="memory budget of the step (GiB) or None")
    # Any, not Either(None, Str): Nipype reads ``nohash`` from the trait type, which
    # Either does not carry.
    dask_scheduler = traits.Any(nohash=True, desc="Dask scheduler address, 'slurm' or None")
    execution = traits.Dict(nohash=True, desc="the execution settings, for provenance")


def _run_stage(stage, **inputs):
    """Run the pipeline stage ``stage`` ("module:function") on ``inputs``, writing into the
    current folder (the node's) when it takes an ``out_dir``; return its declared results,
    a tuple when there are several.

    Nipype ships this function to its worker as source text: it imports inside its body.
    """
    import importlib
    import inspect
    import os

    module, _, name = stage.partition(":")
    step = getattr(importlib.import_module(module), name)
    if "out_dir" in inspect.signature(step).parameters:
        inputs["out_dir"] = os.getcwd()
    values = step.stage_outputs.values(step(**inputs))
    return values if len(values) > 1 else values[0]


def stage_inputs(step):
    """The node inputs of the pipeline stage ``step``: its parameters but ``out_dir``.

    Raises
    ------
    TypeError
        ``step`` is not a stage (:func:`pipeline.stage.stage`), or takes ``*args`` or
        ``**kwargs``.
    """
    if not hasattr(step, "stage_outputs"):
        raise TypeError(f"{step.__qualname__} is not declared a stage (pipeline.stage.stage)")
    parameters = inspect.signature(step).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise TypeError(f"the stage {step.__qualname__} takes *args or **kwargs")
    return [p.name for p in parameters if p.name != "out_dir"]


class StageInterface(niu.Function):
    """The Nipype interface of a pipeline stage: its inputs are the stage's parameters
    (:func:`stage_inputs`), its outputs the results it declares, and those of
    :data:`UNHASHED_INPUTS` are not hashed."""

    input_spec = _StageInputSpec

    def __init__(self, step):
        names = stage_inputs(step)
        unhashed = [n for n in names if n in UNHASHED_INPUTS]
        # Function adds a hashed trait for each name it is given; the stage and the unhashed
        # inputs are declared by the spec already and only need to reach _run_stage.
        super().__init__(function=_run_stage, output_names=list(step.stage_outputs.names),
                         input_names=[n for n in names if n not in unhashed])
        self._input_names.extend(["stage", *unhashed])
        self.inputs.stage = f"{step.__module__}:{step.__name__}"


def stage_node(step, name, *, inputs=None, **kwargs):
    """A node running the pipeline stage ``step`` in its own folder (:class:`StageInterface`).

    Parameters
    ----------
    step : function
        A stage of :mod:`pipeline.steps` (:func:`pipeline.stage.stage`).
    name : str
        The node's name.
    inputs : dict, optional
        Values of some of its inputs (the others come by connections, or are the stage's
        defaults).
    **kwargs
        Of :class:`nipype.pipeline.engine.Node` (``n_procs``, ``mem_gb``, ``overwrite``).

    Raises
    ------
    ValueError
        ``inputs`` names a parameter the stage does not take.
    """
    node = pe.Node(StageInterface(step), name=name, **kwargs)
    unknown = sorted(set(inputs or ()) - set(stage_inputs(step)))
    if unknown:
        raise ValueError(f"the stage {step.__name__} takes no {', '.join(unknown)}")
    node.inputs.trait_set(**(inputs or {}))
    return node


def _declared(steps_memory, stage):
    """The ``mem_gb`` keyword of ``stage``'s node (none: Nipype's default)."""
    return {} if steps_memory is None else {"mem_gb": steps_memory[stage]}


def init_dwi_denoise_wf(*, b0_threshold, denoise, gibbs, n_jobs, mem_gb=None,
                        steps_memory=None, name="dwi_denoise_wf"):
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
        Memory budget (GiB) of the denoising step, which sizes its chunks from it (None:
        default chunks).
    steps_memory : dict, optional
        Memory (GiB) each step declares to the scheduler (:func:`pipeline.memory.steps_mem_gb`).

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
    mask = stage_node(steps.brain_mask, "brain_mask", inputs={"b0_threshold": b0_threshold},
                      **_declared(steps_memory, "brain_mask"))
    noise = stage_node(steps.denoise, "denoise", n_procs=n_jobs,
                       inputs={"method": denoise, "b0_threshold": b0_threshold,
                               "n_jobs": n_jobs, "mem_gb": mem_gb},
                       **_declared(steps_memory, "denoise"))
    files = [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")]
    wf.connect([
        (inputnode, mask, files),
        (inputnode, noise, files),
        (mask, noise, [("mask", "mask_file")]),
        (mask, outputnode, [("b0", "b0"), ("mask", "mask")]),
        (noise, outputnode, [("qc", "denoise_qc")]),
    ])
    if gibbs:
        ringing = stage_node(steps.remove_gibbs, "remove_gibbs", n_procs=n_jobs,
                             inputs={"n_jobs": n_jobs}, **_declared(steps_memory, "remove_gibbs"))
        wf.connect([(noise, ringing, [("dwi", "dwi_file")]),
                    (mask, ringing, [("mask", "mask_file")]),
                    (ringing, outputnode, [("dwi", "dwi")])])
    else:
        wf.connect(noise, "dwi", outputnode, "dwi")
    return wf


def init_dwi_correct_wf(*, b0_threshold, motion, outliers, gradient_check, dti_max_bvalue,
                        n_jobs, mem_gb=None, steps_memory=None, name="dwi_correct_wf"):
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
        Workers for motion correction and the tensor fit.
    mem_gb : float, optional
        Memory budget (GiB) of the tensor fit, which sizes its chunks from it.
    steps_memory : dict, optional
        Memory (GiB) each step declares to the scheduler (:func:`pipeline.memory.steps_mem_gb`).

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
    flag = stage_node(steps.detect_outliers, "detect_outliers",
                      inputs={"b0_threshold": b0_threshold, "action": outliers})
    check = stage_node(steps.check_gradients, "check_gradients",
                       inputs={"mode": gradient_check, "b0_threshold": b0_threshold},
                       **_declared(steps_memory, "check_gradients"))
    fit = stage_node(steps.fit_tensor, "fit_tensor", n_procs=n_jobs,
                     inputs={"b0_threshold": b0_threshold, "max_bvalue": dti_max_bvalue,
                             "n_jobs": n_jobs, "mem_gb": mem_gb},
                     **_declared(steps_memory, "fit_tensor"))
    collect = stage_node(steps.collect_preprocessing_qc, "preprocessing_qc")
    # The series and its b-vectors as they leave motion correction (or skip it).
    series, series_field, bvecs, bvec_field = inputnode, "dwi_file", inputnode, "bvec_file"
    if motion != "none":
        realign = stage_node(steps.correct_motion, "correct_motion", n_procs=n_jobs,
                             inputs={"model": motion, "b0_threshold": b0_threshold,
                                     "n_jobs": n_jobs}, **_declared(steps_memory, "correct_motion"))
        wf.connect([(inputnode, realign, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                                          ("bvec_file", "bvec_file"), ("mask", "mask_file")]),
                    (realign, flag, [("qc", "motion_qc_file")]),
                    (realign, collect, [("qc", "motion_qc")])])
        series, series_field, bvecs, bvec_field = realign, "dwi", realign, "bvec"
    else:
        flag.inputs.motion_qc_file = None
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
        (flag, fit, [("qc", "outliers_file")]),
        (bvecs, check, [(bvec_field, "bvec_file")]),
        (inputnode, check, [("source_bvec_file", "source_bvec_file")]),
        (flag, check, [("qc", "outliers_file")]),
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


def init_dwi_preproc_wf(runs, *, parameters, mem_gb=None, steps_memory=None,
                        name="dwi_preproc_wf"):
    """From the raw series of one run (or several combined runs) to the tensor maps.

    Per run: brain mask → denoising → Gibbs removal; several runs are then
    aligned to the first and concatenated (``pipeline.preprocessing.combine``); then motion/
    eddy correction with b-vector rotation → outlier volumes → tensor fit →
    gradient-table check (beside the registration: it turns only the principal
    direction).

    Parameters
    ----------
    runs : list of pipeline.io.bids.DwiRun
        One run, or the runs to combine (the first is the reference).
    parameters : dict
        The run configuration (``preprocessing`` section and ``n_jobs``).
    mem_gb : float, optional
        The run's memory budget (GiB): the denoising steps and the tensor fit size their
        chunks from it (None: default chunks).
    steps_memory : dict, optional
        Memory (GiB) each step declares to the scheduler (:func:`pipeline.memory.steps_mem_gb`).

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
        n_jobs=n_jobs, mem_gb=mem_gb, steps_memory=steps_memory)
    denoise_wfs = []
    for index, run in enumerate(runs):
        denoise_wf = init_dwi_denoise_wf(b0_threshold=pre["b0_threshold"],
                                         denoise=pre["denoise"], gibbs=pre["gibbs"],
                                         n_jobs=n_jobs, mem_gb=mem_gb,
                                         steps_memory=steps_memory,
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
        join = stage_node(steps.combine_runs, "combine_runs",
                          inputs={"bval_files": [str(r.bval) for r in runs],
                                  "bvec_files": [str(r.bvec) for r in runs],
                                  "b0_threshold": pre["b0_threshold"]})
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
                dti_max_bvalue=DTI_MAX_BVALUE, steps_memory=None, name="cst_wf"):
    """Template registration, the tracking model, CST tracking and 100-node tract profiles.

    Parameters
    ----------
    subject : str
        Subject label (written in the profiles table).
    tracking : dict
        The ``tracking`` section of the run configuration
        (:meth:`workflows.config.RunConfig.parameters`): ``model`` ("dti", "csd" or
        "auto"; :func:`pipeline.steps.fit_fodf`) and keyword arguments of
        :func:`pipeline.steps.track_cst` (direction, fa_stop, gap_fa,
        corridor_radius_mm, max_angle_deg, step_mm, seeds_per_voxel, min_coverage).
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
    steps_memory : dict, optional
        Memory (GiB) each step declares to the scheduler (:func:`pipeline.memory.steps_mem_gb`).

    Inputs
    ------
    fa, md, rd, ad, v1, mask, and dwi, bval, bvec, outliers_qc (for CSD and the
    profiles' bootstrap)

    Outputs
    -------
    rois, mni_z, template_mask, warped_fa, subject_coords, registration_qc, left, right,
    tracking_qc, fodf_qc, profiles_tsv, profiles_json
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["fa", "md", "rd", "ad", "v1", "mask", "dwi", "bval", "bvec", "outliers_qc"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["rois", "mni_z", "template_mask", "warped_fa", "subject_coords",
                "registration_qc", "left", "right", "tracking_qc", "fodf_qc", "profiles_tsv",
                "profiles_json"]), name="outputnode")
    # One process slot: its second thread runs only SyN's field inversions, a fifth of its
    # time, so the other core stays with the gradient check, which runs beside it.
    register = stage_node(steps.register_atlas, "register_atlas", inputs={"n_jobs": n_jobs})
    fodf = stage_node(steps.fit_fodf, "fit_fodf", n_procs=n_jobs,
                      inputs={"model": tracking["model"], "fa_stop": tracking["fa_stop"],
                              "b0_threshold": b0_threshold, "n_jobs": n_jobs},
                      **_declared(steps_memory, "fit_fodf"))
    track = stage_node(steps.track_cst, "track_cst", **_declared(steps_memory, "track_cst"),
                       n_procs=1 if dask_scheduler else n_jobs,  # Dask workers do the tracking
                       inputs={**{k: v for k, v in tracking.items() if k != "model"},
                               "n_jobs": n_jobs, "seed": seed,
                               "dask_scheduler": dask_scheduler})
    profiles = stage_node(steps.tract_profiles, "tract_profiles",
                          inputs={"subject": subject, "b0_threshold": b0_threshold,
                                  "max_bvalue": dti_max_bvalue, "seed": seed})
    wf.connect([
        (inputnode, register, [("fa", "fa_file"), ("mask", "mask_file")]),
        (inputnode, track, [("fa", "fa_file"), ("v1", "v1_file"), ("mask", "mask_file")]),
        (register, track, [("rois", "rois_file"), ("qc", "registration_qc_file"),
                           ("mni_z", "mni_z_file")]),
        (inputnode, fodf, [("dwi", "dwi_file"), ("bval", "bval_file"), ("bvec", "bvec_file"),
                           ("mask", "mask_file"), ("fa", "fa_file"), ("md", "md_file"),
                           ("outliers_qc", "outliers_file")]),
        (register, fodf, [("rois", "rois_file")]),
        (fodf, track, [("sh", "sh_file"), ("qc", "fodf_qc_file")]),
        (fodf, outputnode, [("qc", "fodf_qc")]),
        (inputnode, profiles, [("fa", "fa_file"), ("md", "md_file"), ("rd", "rd_file"),
                               ("ad", "ad_file"), ("dwi", "dwi_file"), ("bval", "bval_file"),
                               ("bvec", "bvec_file"), ("outliers_qc", "outliers_file")]),
        (register, profiles, [("mni_z", "mni_z_file"), ("rois", "rois_file")]),
        (track, profiles, [("left", "left_trk"), ("right", "right_trk")]),
        (register, outputnode, [("rois", "rois"), ("mni_z", "mni_z"),
                                ("template_mask", "template_mask"), ("warped_fa", "warped_fa"),
                                ("subject_coords", "subject_coords"),
                                ("qc", "registration_qc")]),
        (track, outputnode, [("left", "left"), ("right", "right"), ("qc", "tracking_qc")]),
        (profiles, outputnode, [("tsv", "profiles_tsv"), ("json", "profiles_json")]),
    ])
    return wf


def init_dwi_run_wf(run, *, out_dir, parameters, clinical=None, mem_gb=None, name=None):
    """Everything for one diffusion run, from the BIDS files to its derivatives and report.

    Parameters
    ----------
    run : pipeline.io.bids.DwiRun
    out_dir : path
        Root of the BIDS-Derivatives output.
    parameters : dict
        The run configuration (see :meth:`workflows.config.RunConfig.parameters`); it
        is recorded in every output's provenance.
    clinical : dict, optional
        The participant's bedside scores for PREP2
        (:func:`pipeline.clinical.participants.read_clinical_scores`).
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
    runs = list(getattr(run, "runs", [run]))
    steps_memory = steps_mem_gb(runs, n_jobs=parameters["n_jobs"], mem_gb=mem_gb)
    preproc_wf = init_dwi_preproc_wf(runs, parameters=parameters, mem_gb=mem_gb,
                                     steps_memory=steps_memory)
    cst_wf = init_cst_wf(subject=run.subject, tracking=parameters["tracking"],
                         n_jobs=parameters["n_jobs"],
                         seed=parameters["seed"],
                         dask_scheduler=parameters.get("dask_scheduler"),
                         b0_threshold=parameters["preprocessing"]["b0_threshold"],
                         dti_max_bvalue=parameters["preprocessing"]["dti_max_bvalue"],
                         steps_memory=steps_memory)

    source_files = [str(path) for path in run.source_files]
    # Only the settings that decide the results may invalidate the cached assessment.
    results, execution = split_parameters(parameters)
    prognosis = dict(results["prognosis"])
    assess = stage_node(steps.assess, "assess", inputs={
        "subject": run.subject, "entities": dict(run.entities), "input_files": source_files,
        "parameters": results, "execution": execution, "clinical": clinical,
        "thresholds": results["localization"], "qc_limits": results["qc"],
        "prep_plic_ai": prognosis.pop("prep_plic_ai"), "prep2_thresholds": prognosis})
    report = stage_node(steps.make_report, "report", n_procs=parameters["n_jobs"],
                        inputs={"n_jobs": parameters["n_jobs"]})
    write = stage_node(steps.write_derivatives, "write_derivatives", overwrite=True, inputs={
        "report_dir": str(out_dir), "stem": run.stem,
        "derivatives_dir": str(run.derivatives_dir(out_dir)), "source_files": source_files,
        "parameters": parameters})

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
                          ("outputnode.registration_qc", "registration_qc_file"),
                          ("outputnode.warped_fa", "warped_fa_file"),
                          ("outputnode.subject_coords", "subject_coords_file"),
                          ("outputnode.tracking_qc", "tracking_qc_file")]),
        (preproc_wf, assess, [("outputnode.qc", "preprocess_qc_file")]),
        (assess, report, [("metrics", "metrics_json")]),
        (cst_wf, report, [("outputnode.profiles_tsv", "profiles_tsv"),
                          ("outputnode.left", "left_trk"), ("outputnode.right", "right_trk"),
                          ("outputnode.rois", "rois_file"),
                          ("outputnode.template_mask", "template_mask_file")]),
        (preproc_wf, report, [("outputnode.fa", "fa_file"), ("outputnode.v1", "v1_file"),
                              ("outputnode.mask", "mask_file")]),
        (preproc_wf, write, [("outputnode.fa", "fa"), ("outputnode.md", "md"),
                             ("outputnode.rd", "rd"), ("outputnode.ad", "ad"),
                             ("outputnode.mask", "mask")]),
        (cst_wf, write, [("outputnode.rois", "rois"), ("outputnode.left", "left"),
                         ("outputnode.right", "right"),
                         ("outputnode.profiles_tsv", "profiles_tsv")]),
        (assess, write, [("metrics", "metrics")]),
        (report, write, [("html", "report")]),
    ])
    return wf


def init_single_subject_wf(runs, *, out_dir, work_dir, parameters, clinical=None,
                           mem_gb=None, name="single_subject_wf"):
    """One subject: each run (or each set of combined runs) processed and reported.

    Parameters
    ----------
    runs : list of pipeline.io.bids.DwiRun or pipeline.io.bids.CombinedRuns
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
