"""Execution on a cluster: Nipype plugins, their settings, and tracking on Dask.

The tests marked ``slurm`` need a running SLURM cluster (``.ci/slurm_stage.sh``
brings one up on localhost and runs them); elsewhere they are skipped.
"""

import math
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline.errors import EXIT_BAD_INPUT, InputError
from pipeline.io.bids import find_dwi_runs
from pipeline.memory import steps_mem_gb
from pipeline.parallel import dask_backend, parallel_map, require_dask
from pipeline.tracking import propagation as tracking
from pipeline.tracking.propagation import seeds_in_mask, track_dti_deterministic
from workflows.base import init_cst_wf, init_single_subject_wf
from workflows.cli import cst_report_parser, parse_args
from workflows.config import RunConfig
from workflows.execution import SLURM_POLL_SECONDS, run_workflow

from .conftest import run_cst_report

SHAPE = (16, 16, 30)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _slurm_is_up():
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


needs_slurm = pytest.mark.skipif(not _slurm_is_up(), reason="no SLURM cluster answers sinfo")


@pytest.fixture(scope="module")
def tube():
    """A straight tube along z and its seeds, tracked in 5 chunks on this machine (n_jobs=1)."""
    i, j, _ = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    inside = (i - 8) ** 2 + (j - 8) ** 2 <= 9
    fa = np.where(inside, 0.7, 0.05)
    v1 = np.zeros(SHAPE + (3,))
    v1[..., 2] = 1.0
    field = (v1, fa, np.ones(SHAPE, dtype=bool), AFFINE)
    seeds = seeds_in_mask(inside, AFFINE, seeds_per_voxel=2, random_seed=1)
    mp = pytest.MonkeyPatch()
    mp.setattr(tracking, "SEED_CHUNK_SIZE", len(seeds) // 5 + 1)
    reference = track_dti_deterministic(seeds, *field, n_jobs=1, random_seed=3)
    yield seeds, field, reference
    mp.undo()


def _assert_same_streamlines(a, b):
    assert len(a) == len(b) > 0
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_tracking_on_a_dask_cluster_equals_local(tube):
    distributed = pytest.importorskip("distributed")
    seeds, field, reference = tube
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, \
            distributed.get_task_stream(client) as tasks:
        on_dask = track_dti_deterministic(seeds, *field, n_jobs=2, random_seed=3,
                                          dask_scheduler=cluster.scheduler_address)
    _assert_same_streamlines(reference, on_dask)
    # every chunk went through the Dask scheduler (joblib batches them into tasks)
    assert any("_track_chunk" in task["key"] for task in tasks.data)


def test_probabilistic_csd_on_a_dask_cluster_equals_local(tube):
    """The random streams are per chunk, so probabilistic tracking on Dask repeats the local run."""
    distributed = pytest.importorskip("distributed")
    from dipy.reconst.shm import sf_to_sh

    seeds, (_, fa, _, affine), _ = tube
    sphere = tracking.TRACKING_SPHERE
    odf_along_z = np.exp(-20.0 * (1.0 - sphere.z ** 2))  # one fibre population along z
    sh = np.zeros(SHAPE + (28,))
    sh[fa > 0.5] = sf_to_sh(odf_along_z, sphere, sh_order_max=6, basis_type="descoteaux07",
                            legacy=False)
    local = tracking.track_csd(seeds, sh, fa, affine, direction="prob", random_seed=5)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        on_dask = tracking.track_csd(seeds, sh, fa, affine, direction="prob", n_jobs=2,
                                     random_seed=5, dask_scheduler=cluster.scheduler_address)
    _assert_same_streamlines(local, on_dask)
    assert np.mean([np.ptp(s[:, 2]) > 40 for s in local]) > 0.5  # they follow the tube


def test_missing_dask_is_a_usage_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    with pytest.raises(InputError, match=r"cst-integrity\[dask\]"):
        require_dask("tcp://127.0.0.1:8786")
    require_dask(None)  # no Dask asked for: nothing needed


def test_cli_refuses_dask_scheduler_without_dask_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "no-dask"
    blocker.mkdir()
    (blocker / "distributed.py").write_text("raise ImportError('not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    out = tmp_path / "out"
    result = run_cst_report("01", tmp_path, out, "--dask-scheduler", "tcp://127.0.0.1:8786")
    assert result.returncode == EXIT_BAD_INPUT
    assert "cst-integrity[dask]" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_execution_settings_round_trip_through_the_config_file(tmp_path):
    argv = ["--plugin", "SLURM", "--plugin-args",
            '{"sbatch_args": "--mem=8G -p \\"short\\"", "max_jobs": 20}',
            "--dask-scheduler", "slurm", "--n-jobs", "4"]
    printed = RunConfig.from_args(parse_args(cst_report_parser(), argv)).to_toml()
    assert 'plugin = "SLURM"' in printed and 'dask_scheduler = "slurm"' in printed
    config = tmp_path / "cst.toml"
    config.write_text(printed)
    args = parse_args(cst_report_parser(), ["--config", str(config)])
    assert args.plugin == "SLURM" and args.dask_scheduler == "slurm"
    assert args.plugin_args == {"sbatch_args": '--mem=8G -p "short"', "max_jobs": 20}
    assert RunConfig.from_args(args).to_toml() == printed
    # the defaults print as a valid file too
    default = RunConfig.from_args(parse_args(cst_report_parser(), [])).to_toml()
    assert 'plugin = "MultiProc"' in default and "plugin_args = {}" in default


@pytest.mark.parametrize("value", ["not json", '["a list"]'])
def test_plugin_args_must_be_a_json_object(value, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(cst_report_parser(), ["--plugin-args", value])
    assert exc.value.code == 2
    assert "JSON object" in capsys.readouterr().err


def _two_step_workflow(base_dir):
    wf = pe.Workflow(name="two_steps", base_dir=str(base_dir))
    heavy = pe.Node(niu.IdentityInterface(fields=["x"]), name="heavy", n_procs=2)
    light = pe.Node(niu.IdentityInterface(fields=["x"]), name="light")
    wf.connect(heavy, "x", light, "x")
    return wf


def test_slurm_plugin_gets_cores_per_step_and_a_gentle_poll(tmp_path, monkeypatch):
    wf = _two_step_workflow(tmp_path)
    calls = []
    monkeypatch.setattr(wf, "run", lambda plugin, plugin_args: calls.append((plugin, plugin_args)))
    monkeypatch.delenv("LOGNAME", raising=False)  # unset in CI and containers
    run_workflow(wf, plugin="SLURM", plugin_args={"sbatch_args": "--mem=2G"}, n_procs=8)
    assert calls == [("SLURM", {"sbatch_args": "--mem=2G"})]
    assert wf.get_node("heavy").plugin_args == {"sbatch_args": "--cpus-per-task=2"}
    assert wf.get_node("light").plugin_args == {}
    assert wf.config["execution"]["poll_sleep_duration"] == SLURM_POLL_SECONDS
    assert os.environ["LOGNAME"]


@pytest.mark.parametrize("plugin, user_args, expected", [
    ("MultiProc", {}, {"n_procs": 3, "raise_insufficient": False}),
    ("MultiProc", {"n_procs": 1}, {"n_procs": 1, "raise_insufficient": False}),
    ("Linear", {}, {}),
])
def test_local_plugins_get_the_pool_size_unless_overridden(tmp_path, monkeypatch, plugin,
                                                           user_args, expected):
    wf = _two_step_workflow(tmp_path)
    calls = []
    monkeypatch.setattr(wf, "run", lambda plugin, plugin_args: calls.append((plugin, plugin_args)))
    run_workflow(wf, plugin=plugin, plugin_args=user_args, n_procs=3)
    assert calls == [(plugin, expected)]
    assert wf.get_node("heavy").plugin_args == {}


#: The steps that declare their memory (pipeline.memory.steps_mem_gb) in the default graph.
DECLARING_MEMORY = {"brain_mask", "denoise", "remove_gibbs", "correct_motion", "check_gradients",
                    "fit_tensor", "fit_fodf", "track_cst"}


@pytest.fixture
def small_run(tmp_path):
    """One run of sub-01 whose header (16×16×12, 13 volumes, int16) is all the graph reads."""
    dwi = tmp_path / "bids" / "sub-01" / "dwi"
    dwi.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12, 13), np.int16), np.eye(4)),
             str(dwi / "sub-01_dwi.nii.gz"))
    for suffix in (".bval", ".bvec"):
        (dwi / f"sub-01_dwi{suffix}").touch()
    return find_dwi_runs(tmp_path / "bids", "01")


def _submitted_graph(runs, tmp_path, monkeypatch, plugin, plugin_args):
    """The pipeline's graph with --n-jobs 2, handed to run_workflow (Nipype's run stubbed
    out); also the cache key of each step before and after."""
    args = cst_report_parser().parse_args(["01", "--bids-dir", "x", "--out-dir", "y",
                                           "--n-jobs", "2"])
    wf = init_single_subject_wf(runs, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                                parameters=RunConfig.from_args(args).parameters())
    monkeypatch.setattr(wf, "run", lambda plugin, plugin_args: None)
    nodes = wf._get_all_nodes()
    keys = [node.inputs.get_hashval()[1] for node in nodes]
    run_workflow(wf, plugin=plugin, plugin_args=plugin_args, n_procs=2)
    assert [node.inputs.get_hashval()[1] for node in nodes] == keys  # nothing recomputed
    return nodes


@pytest.mark.parametrize("user_sbatch_args, memory, cores", [
    ("", True, True),
    ("--mem=10G --time=01:00:00", False, True),  # the user's memory, for every job
    ("--mem-per-cpu=4G", False, True),  # SLURM refuses it beside --mem
    ("-c 4 -p short", True, False),
    ("--cpus-per-task=4", True, False),
])
def test_slurm_jobs_ask_for_the_memory_and_cores_each_step_declares(
        small_run, tmp_path, monkeypatch, user_sbatch_args, memory, cores):
    monkeypatch.setenv("LOGNAME", "cst")
    nodes = _submitted_graph(small_run, tmp_path, monkeypatch, "SLURM",
                             {"sbatch_args": user_sbatch_args})
    declared = steps_mem_gb(small_run, n_jobs=2)
    for node in nodes:
        expected = []
        if memory and node.name in DECLARING_MEMORY:
            expected.append(f"--mem={math.ceil(declared[node.name] * 1024)}M")
        if cores and node.n_procs > 1:
            expected.append(f"--cpus-per-task={node.n_procs}")
        assert node.plugin_args == ({"sbatch_args": " ".join(expected)} if expected else {}), \
            node.fullname
    by_name = {node.name: node for node in nodes}
    assert DECLARING_MEMORY <= set(by_name) and by_name["denoise"].n_procs == 2


@pytest.mark.parametrize("plugin", ["MultiProc", "Linear"])
def test_local_plugins_leave_the_steps_sbatch_free(small_run, tmp_path, monkeypatch, plugin):
    nodes = _submitted_graph(small_run, tmp_path, monkeypatch, plugin, {})
    assert all(node.plugin_args == {} for node in nodes)


def test_unknown_plugin_is_a_usage_error(tmp_path):
    with pytest.raises(InputError, match="Unknown plugin"):
        run_workflow(_two_step_workflow(tmp_path), plugin="PBS", plugin_args={}, n_procs=1)


def test_dask_scheduler_reaches_the_tracking_node():
    tracking_settings = RunConfig().parameters()["tracking"]
    wf = init_cst_wf(subject="01", tracking=tracking_settings, n_jobs=4, seed=0,
                     dask_scheduler="tcp://10.0.0.5:8786")
    track = wf.get_node("track_cst")
    assert track.inputs.dask_scheduler == "tcp://10.0.0.5:8786"
    assert track.n_procs == 1  # the Dask workers do the work, not this machine's cores
    local = init_cst_wf(subject="01", tracking=tracking_settings, n_jobs=4,
                        seed=0).get_node("track_cst")
    assert local.inputs.dask_scheduler is None and local.n_procs == 4


@pytest.mark.slurm
@needs_slurm
def test_tracking_on_a_dask_slurm_cluster_equals_local(tube, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)  # the worker jobs' logs land in the submission directory
    seeds, field, reference = tube
    on_slurm = track_dti_deterministic(seeds, *field, n_jobs=2, random_seed=3,
                                       dask_scheduler="slurm")
    _assert_same_streamlines(reference, on_slurm)


@pytest.mark.slurm
@needs_slurm
def test_dask_slurm_workers_are_slurm_jobs(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)
    with dask_backend("slurm", n_workers=2):
        job_ids = parallel_map(os.getenv, [("SLURM_JOB_ID",)] * 8, n_jobs=2)
    assert all(job_id and job_id.isdigit() for job_id in job_ids)
