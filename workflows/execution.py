"""How a run is executed: the plugin, the number of workers and the work directory.

SLURM goes through Nipype's SLURM plugin: every node becomes one ``sbatch``
job, submitted when its inputs are ready, asking for the memory and cores the
node declares (``--mem`` from its ``mem_gb``, ``--cpus-per-task`` from its
``n_procs``: :func:`sbatch_resources`). Everything the jobs read (the Python
environment, the work and output directories) must be on a filesystem the
compute nodes share.

None of these settings changes a result. The ones that reach the workflow
(:data:`EXECUTION_SETTINGS`) are therefore kept out of Nipype's cache keys and
out of the test that finds a run's outputs up to date
(:func:`outputs_up_to_date`), so that changing them recomputes nothing.

The work directory holds one folder per subject (:func:`subject_work_dir`):
its Nipype cache and the crash reports of its failed steps. A failed or
interrupted run keeps it, so that a rerun resumes; a successful run removes it
(:func:`remove_subject_work`) unless asked to keep it, because its outputs are
complete and a rerun with the same inputs and settings recomputes nothing.
"""

import argparse
import gc
import getpass
import inspect
import json
import logging
import math
import os
import shlex
import shutil
from pathlib import Path

from pipeline.errors import InputError

LOG = logging.getLogger("cst")

#: Nipype plugins the command line offers.
PLUGINS = ("Linear", "MultiProc", "SLURM")

#: Keys of the run configuration that decide how a run is executed, never what it computes.
EXECUTION_SETTINGS = ("n_jobs", "mem_gb", "dask_scheduler")

#: ``--n-jobs`` value meaning every core this process may use (:func:`available_cores`).
ALL_CORES = -1

#: Seconds between ``squeue`` polls of the SLURM plugin (Nipype's default). The
#: 0.05 s used for MultiProc would flood the SLURM controller with queries.
SLURM_POLL_SECONDS = 2.0

#: ``sbatch`` options that set a job's memory (SLURM takes only one of them) and its cores.
SBATCH_MEMORY_OPTIONS = frozenset({"--mem", "--mem-per-cpu", "--mem-per-gpu"})
SBATCH_CORES_OPTIONS = frozenset({"--cpus-per-task", "-c"})


def parse_plugin_args(text):
    """``--plugin-args`` value: a JSON object (argparse ``type``).

    Examples: ``'{"sbatch_args": "--mem=8G -p short", "max_jobs": 20}'`` for
    SLURM, ``'{"n_procs": 4}'`` for MultiProc.
    """
    example = """'{"sbatch_args": "--mem=8G"}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); write a JSON object, "
                                         f"e.g. {example}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"write a JSON object, e.g. {example}")
    return value


def check_n_jobs(value):
    """A valid ``n_jobs`` setting: a positive number of workers, or -1 for all cores.

    Parameters
    ----------
    value : int or str
        As written on the command line or in a configuration file.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        With a one-line message saying what is allowed.
    """
    allowed = "give a number of workers (1 or more), or -1 for all available cores"
    number = None
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):  # TOML true is an int too
        number = value
    if number is None:
        raise ValueError(f"{value!r} is not an integer; {allowed}")
    if number == 0 or number < ALL_CORES:
        raise ValueError(f"{number} workers is not possible; {allowed}")
    return number


def available_cores():
    """Cores this process may use.

    SLURM's allocation (``SLURM_CPUS_PER_TASK``) when it sets one, else the CPU
    affinity of this process (which honours cgroup-free pinning such as
    ``taskset``), else the machine's CPU count.

    Returns
    -------
    int
    """
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux (macOS)
        return os.cpu_count() or 1


def check_mem_gb(value):
    """A valid ``mem_gb`` setting: a positive memory budget in GiB.

    Raises
    ------
    ValueError
        With a one-line message saying what is allowed.
    """
    allowed = "give the memory the run may use in GiB, e.g. 8 or 0.5"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number; {allowed}") from None
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise ValueError(f"{value!r} GiB is not possible; {allowed}")
    return number


def argparse_type(check):
    """An argparse ``type`` from a setting's ``check`` (value → value, ``ValueError`` with a
    one-line message): the same rule for the command line as for the TOML file."""

    def parse(text):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = check.__name__.replace("check_", "")
    return parse


def available_memory_gb():
    """Memory (GiB) this run may use: SLURM's allocation when it sets one
    (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` × ``SLURM_CPUS_PER_TASK``, in MB),
    else what the machine has available now (``MemAvailable`` capped by a cgroup limit);
    None when neither is known.
    """
    from pipeline.io.dwi import available_memory_bytes

    per_node = os.environ.get("SLURM_MEM_PER_NODE", "").strip()
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU", "").strip()
    if per_node.isdigit() and int(per_node) > 0:
        return int(per_node) / 1024
    if per_cpu.isdigit() and int(per_cpu) > 0:
        return int(per_cpu) * available_cores() / 1024
    available = available_memory_bytes()
    return None if available is None else available / 2 ** 30


def resolve_mem_gb(mem_gb):
    """The memory budget (GiB) of a run: ``mem_gb``, or :func:`available_memory_gb` when it
    is None (None when that is unknown too: no budget, the default chunk sizes)."""
    if mem_gb is not None:
        return mem_gb
    available = available_memory_gb()
    return None if available is None else round(available, 2)


def resolve_n_jobs(n_jobs):
    """The number of workers ``n_jobs`` stands for (:data:`ALL_CORES`: :func:`available_cores`).

    Parameters
    ----------
    n_jobs : int
        A value accepted by :func:`check_n_jobs`.

    Returns
    -------
    int
        1 or more.
    """
    return available_cores() if n_jobs == ALL_CORES else n_jobs


def split_parameters(parameters):
    """Split the run configuration into what decides the results and how they are executed.

    Parameters
    ----------
    parameters : dict
        The run configuration (:meth:`workflows.config.RunConfig.parameters`).

    Returns
    -------
    results : dict
        Every setting but :data:`EXECUTION_SETTINGS`.
    execution : dict
        :data:`EXECUTION_SETTINGS` (those present).
    """
    results = {k: v for k, v in parameters.items() if k not in EXECUTION_SETTINGS}
    execution = {k: parameters[k] for k in EXECUTION_SETTINGS if k in parameters}
    return results, execution


def outputs_up_to_date(run, out_dir, parameters, clinical):
    """Whether ``run``'s outputs in ``out_dir`` are complete and need no recomputing.

    They need none when every derivative file and the report are there and the
    metrics JSON records what this run would use: the same input files (paths
    and SHA-256), the same settings apart from :data:`EXECUTION_SETTINGS`, the
    same software versions and the same bedside scores.

    Parameters
    ----------
    run : pipeline.io.bids.DwiRun or pipeline.io.bids.CombinedRuns
    out_dir : path
        Root of the BIDS-Derivatives output.
    parameters : dict
        The run configuration of this run.
    clinical : dict or None
        The participant's bedside scores
        (:func:`pipeline.clinical.participants.read_clinical_scores`).

    Returns
    -------
    bool
    """
    from pipeline.io.derivatives import DERIVATIVES
    from pipeline.io.outputs import file_sha256, software_versions

    folder = run.derivatives_dir(out_dir)
    metrics_file = folder / f"{run.stem}_desc-cst_metrics.json"
    expected = [metrics_file, Path(out_dir) / f"{run.stem}.html",
                *(folder / f"{run.stem}{suffix}" for suffix, _ in DERIVATIVES.values())]
    if not all(path.is_file() for path in expected):
        return False
    try:
        metrics = json.loads(metrics_file.read_text())
        recorded = metrics["provenance"]
        recorded_results, _ = split_parameters(recorded["parameters"])
        recorded_clinical = metrics["clinical"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unreadable, or written in an older layout: made again
    results, _ = split_parameters(parameters)
    if (recorded_results != _as_json(results) or recorded_clinical != _as_json(clinical)
            or recorded.get("software") != _as_json(software_versions())):
        return False
    # Last, as it reads every input: the checksums.
    inputs = {Path(p).name: {"path": str(p), "sha256": file_sha256(p)}
              for p in run.source_files}
    return recorded.get("inputs") == inputs


def _as_json(value):
    """``value`` as it reads back from the metrics JSON (tuples become lists, and so on)."""
    return json.loads(json.dumps(value))


def subject_work_dir(work_dir, label):
    """The folder of ``sub-<label>`` in the work directory.

    It holds the subject's Nipype cache (the graph of
    :func:`workflows.base.init_single_subject_wf`), the crash reports of its
    failed steps and, with the SLURM plugin, its batch scripts.

    Parameters
    ----------
    work_dir : path
    label : str
        Bare subject label.

    Returns
    -------
    pathlib.Path
    """
    return Path(work_dir) / f"single_subject_wf_{label}"


def remove_subject_work(work_dir, label):
    """Remove the folder of ``sub-<label>`` (:func:`subject_work_dir`) from ``work_dir``.

    Other subjects' folders and the state of ``scripts/slurm_array.py``
    (``slurm-array/``) stay. A folder that cannot be removed is reported in
    the log and left: the run itself has succeeded.

    Parameters
    ----------
    work_dir : path
    label : str
        Bare subject label.
    """
    folder = subject_work_dir(work_dir, label)
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("The work folder %s could not be removed (%s); delete it by hand.",
                    folder, exc)


def run_workflow(wf, *, plugin, plugin_args, n_procs, memory_gb=None, status_callback=None):
    """Run ``wf`` through ``plugin``.

    Parameters
    ----------
    wf : nipype Workflow
    plugin : {"Linear", "MultiProc", "SLURM"}
    plugin_args : dict
        Passed to the Nipype plugin (they win over the settings made here),
        e.g. ``sbatch_args``, ``max_jobs``, ``template`` for SLURM.
    n_procs : int
        Processes of the MultiProc pool.
    memory_gb : float, optional
        Memory (GiB) MultiProc shares among the steps by their ``mem_gb`` (None: Nipype's
        default, 90 % of the machine's).
    status_callback : callable, optional
        Nipype status callback (progress reporting).
    """
    if plugin not in PLUGINS:
        raise InputError(f"Unknown plugin {plugin!r}.", fix=f"Use one of {', '.join(PLUGINS)}.")
    settings = {}
    if plugin == "MultiProc":
        settings = {"n_procs": n_procs, "raise_insufficient": False}
        if memory_gb is not None:
            settings["memory_gb"] = memory_gb
    elif plugin == "SLURM":
        _prepare_for_slurm(wf, plugin_args.get("sbatch_args", ""))
    settings.update(plugin_args)
    if status_callback is not None:
        settings["status_callback"] = status_callback
    # Nipype's schedulers call gc.collect() before every submission: over the objects of the
    # libraries imported by then (DIPY, SciPy, Numba, ...) each call took 0.12 s, 2.4 s of a
    # sub-philips01 run between its steps. Frozen, they are left out of every collection,
    # here and in the MultiProc workers forked from here, whose own collections (SyN
    # allocates a lot) had been walking them too: the run went from 77-82 s to 64-69 s.
    gc.freeze()
    try:
        wf.run(plugin=plugin, plugin_args=settings)
    finally:
        gc.unfreeze()


def sbatch_resources(node, sbatch_args=""):
    """The ``sbatch`` options asking for the memory and cores ``node`` declares to Nipype's
    scheduler: ``--mem`` its ``mem_gb`` (in MiB, rounded up), ``--cpus-per-task`` its
    ``n_procs``.

    Nipype's SLURM plugin reads neither ``mem_gb`` nor ``n_procs``: it submits every node
    with the plugin's ``sbatch_args`` and the node's own ``plugin_args["sbatch_args"]``, so
    without these options each step would get the partition's default memory and cores.
    They cost the cache nothing: ``plugin_args`` are not among the inputs Nipype hashes.

    Parameters
    ----------
    node : nipype.pipeline.engine.Node
    sbatch_args : str
        The plugin's ``sbatch_args``, given for every job. The user's choice wins: an option
        of :data:`SBATCH_MEMORY_OPTIONS` or :data:`SBATCH_CORES_OPTIONS` in it is not
        requested again, as the node's options come after it on the command line and
        sbatch takes the last.

    Returns
    -------
    str
        Empty when there is nothing to ask for: ``--mem`` only for a node that declares its
        memory (Nipype's default ``mem_gb``, 0.2 GB, is a placeholder below one Python
        process of the run), ``--cpus-per-task`` only for more than SLURM's default core.
    """
    from nipype.pipeline.engine import Node

    given = _sbatch_option_names(sbatch_args)
    options = []
    if (node.mem_gb != inspect.signature(Node).parameters["mem_gb"].default
            and not given & SBATCH_MEMORY_OPTIONS):
        options.append(f"--mem={math.ceil(node.mem_gb * 1024)}M")
    if node.n_procs > 1 and not given & SBATCH_CORES_OPTIONS:
        options.append(f"--cpus-per-task={node.n_procs}")
    return " ".join(options)


def _sbatch_option_names(sbatch_args):
    """The options named in an ``sbatch`` command line: ``"--mem=8G -c4 -p short"`` →
    ``{"--mem", "-c", "-p"}``."""
    names = set()
    for word in shlex.split(sbatch_args):
        if word.startswith("--"):
            names.add(word.partition("=")[0])
        elif word.startswith("-"):
            names.add(word[:2])  # "-c 4" and "-c4"
    return names


def _prepare_for_slurm(wf, sbatch_args):
    """Ready ``wf`` for Nipype's SLURM plugin, whose every job gets ``sbatch_args``: each
    node that has no ``sbatch_args`` of its own asks for its resources
    (:func:`sbatch_resources`)."""
    # Nipype names each job after $LOGNAME and fails where it is unset (containers, CI).
    if "LOGNAME" not in os.environ:
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):  # a uid without a passwd entry (containers)
            os.environ["LOGNAME"] = str(os.getuid())
    wf.config["execution"]["poll_sleep_duration"] = SLURM_POLL_SECONDS
    for node in wf._get_all_nodes():
        resources = sbatch_resources(node, sbatch_args)
        if resources and "sbatch_args" not in node.plugin_args:
            node.plugin_args = {**node.plugin_args, "sbatch_args": resources}
