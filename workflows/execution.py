"""Running a Nipype workflow through the chosen plugin: Linear, MultiProc or SLURM.

SLURM goes through Nipype's SLURM plugin: every node becomes one ``sbatch``
job, submitted when its inputs are ready, with ``--cpus-per-task`` set to the
node's ``n_procs``. Everything the jobs read (the Python environment, the
work and output directories) must be on a filesystem the compute nodes share.
"""

import argparse
import gc
import getpass
import json
import os

from pipeline.errors import InputError

#: Nipype plugins the command line offers.
PLUGINS = ("Linear", "MultiProc", "SLURM")

#: Seconds between ``squeue`` polls of the SLURM plugin (Nipype's default). The
#: 0.05 s used for MultiProc would flood the SLURM controller with queries.
SLURM_POLL_SECONDS = 2.0


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


def run_workflow(wf, *, plugin, plugin_args, n_procs, status_callback=None):
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
    status_callback : callable, optional
        Nipype status callback (progress reporting).
    """
    if plugin not in PLUGINS:
        raise InputError(f"Unknown plugin {plugin!r}.", fix=f"Use one of {', '.join(PLUGINS)}.")
    settings = {}
    if plugin == "MultiProc":
        settings = {"n_procs": n_procs, "raise_insufficient": False}
    elif plugin == "SLURM":
        _prepare_for_slurm(wf)
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


def _prepare_for_slurm(wf):
    # Nipype names each job after $LOGNAME and fails where it is unset (containers, CI).
    if "LOGNAME" not in os.environ:
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):  # a uid without a passwd entry (containers)
            os.environ["LOGNAME"] = str(os.getuid())
    wf.config["execution"]["poll_sleep_duration"] = SLURM_POLL_SECONDS
    for node in wf._get_all_nodes():
        if node.n_procs > 1 and "sbatch_args" not in node.plugin_args:
            node.plugin_args = {**node.plugin_args,
                                "sbatch_args": f"--cpus-per-task={node.n_procs}"}
