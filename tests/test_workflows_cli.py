"""Workflow wiring and command-line behaviour that needs no heavy computation."""

import fcntl
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from pipeline.errors import EXIT_BAD_INPUT, BusyError, InputError
from pipeline.io.bids import find_dwi_runs
from pipeline.memory import steps_mem_gb
from pipeline.stage import stage
from workflows.base import init_single_subject_wf, stage_node
from workflows.cli import (
    _Progress,
    bids_app_parser,
    cst_report_parser,
    parse_args,
    subject_lock,
)
from workflows.config import RunConfig
from workflows.execution import (
    remove_subject_work,
    resolve_mem_gb,
    run_workflow,
    subject_work_dir,
)

from .conftest import REPO, run_cst_report


def _write_run(dwi_dir, stem, n_dirs=12):
    dwi_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.uniform(100, 200, size=(16, 16, 12, n_dirs + 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(dwi_dir / f"{stem}.nii.gz"))
    dirs = rng.normal(size=(n_dirs, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvecs = np.vstack([[0, 0, 0], dirs]).T
    np.savetxt(dwi_dir / f"{stem}.bvec", bvecs, fmt="%.6f")
    np.savetxt(dwi_dir / f"{stem}.bval", [[0] + [1000] * n_dirs], fmt="%d")


@pytest.fixture
def two_run_bids(tmp_path):
    bids = tmp_path / "bids"
    (bids).mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for direction in ("AP", "PA"):
        _write_run(bids / "sub-01" / "dwi", f"sub-01_dir-{direction}_dwi")
    return bids


def test_each_run_gets_its_own_workflow_and_outputs(two_run_bids, tmp_path):
    runs = find_dwi_runs(two_run_bids, "sub-01")
    args = cst_report_parser().parse_args(["01", "--bids-dir", "x", "--out-dir", "y"])
    wf = init_single_subject_wf(runs, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                                parameters=RunConfig.from_args(args).parameters())
    names = wf.list_node_names()
    for stem in ("sub_01_dir_AP_wf", "sub_01_dir_PA_wf"):
        assert f"{stem}.write_derivatives" in names
        assert f"{stem}.cst_wf.track_cst" in names
    stems = sorted(wf.get_node(f"{s}.write_derivatives").inputs.stem
                   for s in ("sub_01_dir_AP_wf", "sub_01_dir_PA_wf"))
    assert stems == ["sub-01_dir-AP", "sub-01_dir-PA"]


@pytest.mark.parametrize("subject, expected", [
    ("sub-02", "not found"),          # subject missing
    ("sub-0_1", "not a BIDS subject label"),
])
def test_bad_subject_is_a_clear_error(two_run_bids, tmp_path, subject, expected):
    out = tmp_path / "out"
    result = run_cst_report(subject, two_run_bids, out)
    assert result.returncode == EXIT_BAD_INPUT
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written for a refused input


def test_bad_gradient_file_is_refused_before_any_work(two_run_bids, tmp_path):
    bval = two_run_bids / "sub-01" / "dwi" / "sub-01_dir-PA_dwi.bval"
    bval.write_text("0 1000 1000\n")  # fewer b-values than volumes
    before = bval.read_bytes()
    out = tmp_path / "out"
    result = run_cst_report("01", two_run_bids, out)
    assert result.returncode == EXIT_BAD_INPUT
    assert "sub-01_dir-PA_dwi.bval" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert bval.read_bytes() == before  # inputs are never modified


def test_help_lists_examples_and_exit_codes():
    text = cst_report_parser().format_help()
    assert "examples:" in text and "exit codes:" in text and "--n-jobs" in text


def test_relative_paths_reach_the_workflow_as_absolute(two_run_bids, monkeypatch):
    monkeypatch.chdir(two_run_bids.parent)
    runs = find_dwi_runs("bids", "01")
    assert all(r.dwi.is_absolute() and r.bval.is_absolute() and r.bvec.is_absolute()
               for r in runs)


def _subject_wf(runs, tmp_path, *argv):
    args = cst_report_parser().parse_args(["01", "--bids-dir", "x", "--out-dir", "y", *argv])
    parameters = RunConfig.from_args(args).parameters()
    return init_single_subject_wf(runs, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                                  parameters=parameters, mem_gb=parameters["mem_gb"])


def test_execution_settings_do_not_enter_the_cache_keys(two_run_bids, tmp_path):
    """Changing --n-jobs, --mem-gb or --dask-scheduler recomputes nothing (each step's hash
    is the same), while each step still claims its workers (n_procs) and denoising its
    memory (mem_gb) from MultiProc."""
    runs = find_dwi_runs(two_run_bids, "sub-01")
    one = _subject_wf(runs, tmp_path, "--n-jobs", "1")
    three = _subject_wf(runs, tmp_path, "--n-jobs", "3", "--dask-scheduler", "tcp://h:8786",
                        "--mem-gb", "5")
    reseeded = _subject_wf(runs, tmp_path, "--n-jobs", "1", "--seed", "7")

    def key(wf, name):
        return wf.get_node(name).inputs.get_hashval()[1]

    names = one.list_node_names()
    always_run = {n for n in names if one.get_node(n).overwrite}
    assert always_run == {"sub_01_dir_AP_wf.write_derivatives",
                          "sub_01_dir_PA_wf.write_derivatives"}
    assert [n for n in names if n not in always_run and key(one, n) != key(three, n)] == []
    track = "sub_01_dir_AP_wf.cst_wf.track_cst"
    assert key(one, track) != key(reseeded, track)  # a setting of the results does count
    denoise = "sub_01_dir_AP_wf.dwi_preproc_wf.dwi_denoise_wf_0.denoise"
    assert one.get_node(denoise).n_procs == 1 and three.get_node(denoise).n_procs == 3
    assert three.get_node(denoise).inputs.n_jobs == 3  # and the step gets the value
    assert three.get_node(denoise).inputs.mem_gb == 5  # the budget its chunks come from
    # what it declares: its estimated peak (pipeline.memory), with 3 workers and that budget
    assert three.get_node(denoise).mem_gb == steps_mem_gb(runs[:1], n_jobs=3, mem_gb=5)[
        "denoise"] > one.get_node(denoise).mem_gb
    assert three.get_node("sub_01_dir_AP_wf.assess").inputs.execution == {
        "n_jobs": 3, "mem_gb": 5, "dask_scheduler": "tcp://h:8786"}


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_n_jobs_is_a_usage_error(value, capsys):
    for parser in (cst_report_parser(), bids_app_parser()):
        with pytest.raises(SystemExit) as exc:
            parse_args(parser, [f"--n-jobs={value}"])
        assert exc.value.code == EXIT_BAD_INPUT
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --n-jobs:" in message and "-1 for all available cores" in message


@pytest.mark.parametrize("value", ["0", "-3", "true", "1.5", '"all"'])
def test_bad_n_jobs_in_the_config_file_is_an_input_error(value, tmp_path):
    config = tmp_path / "cst.toml"
    config.write_text(f"[execution]\nn_jobs = {value}\n")
    with pytest.raises(InputError, match="execution.n_jobs") as exc:
        parse_args(cst_report_parser(), ["--config", str(config)])
    assert exc.value.exit_code == EXIT_BAD_INPUT and exc.value.path == config


def test_n_jobs_minus_one_is_every_core_this_process_may_use(monkeypatch, tmp_path):
    config = tmp_path / "cst.toml"
    config.write_text("[execution]\nn_jobs = -1\n")
    args = parse_args(cst_report_parser(), ["--config", str(config)])
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert RunConfig.from_args(args).parameters()["n_jobs"] == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # inside a SLURM job: its allocation
    assert RunConfig.from_args(args).parameters()["n_jobs"] == 6
    assert "n_jobs = -1" in RunConfig.from_args(args).to_toml()  # the setting, not the count


@pytest.mark.parametrize("value", ["0", "-1", "lots", "inf"])
def test_bad_mem_gb_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(cst_report_parser(), [f"--mem-gb={value}"])
    assert exc.value.code == EXIT_BAD_INPUT
    assert "argument --mem-gb:" in capsys.readouterr().err


def test_mem_gb_defaults_to_the_slurm_allocation_or_the_machine(monkeypatch, tmp_path):
    """Recorded as given (None: the default), resolved when the run starts."""
    args = parse_args(cst_report_parser(), [])
    assert RunConfig.from_args(args).parameters()["mem_gb"] is None
    for name in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    machine = resolve_mem_gb(None)
    assert 0 < machine <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "8192")  # MB, as SLURM writes it
    assert resolve_mem_gb(None) == 8 and resolve_mem_gb(3.5) == 3.5
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "3072")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert resolve_mem_gb(None) == 12
    config = tmp_path / "cst.toml"
    config.write_text("[execution]\nmem_gb = 2.5\n")
    args = parse_args(cst_report_parser(), ["--config", str(config)])
    assert RunConfig.from_args(args).parameters()["mem_gb"] == 2.5
    config.write_text("[execution]\nmem_gb = 0\n")
    with pytest.raises(InputError, match="execution.mem_gb"):
        parse_args(cst_report_parser(), ["--config", str(config)])


def test_participant_label_takes_the_bids_apps_spelling():
    parser = bids_app_parser()
    for option in ("--participant_label", "--participant-label"):
        args = parse_args(parser, ["bids", "out", "participant", option, "01", "02"])
        assert args.participant_label == ["01", "02"]


def test_cst_integrity_refuses_bad_n_jobs_in_a_fresh_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from workflows.cli import bids_app_main; bids_app_main()",
         str(tmp_path), str(tmp_path / "out"), "participant", "--n-jobs", "0"],
        capture_output=True, text=True, cwd=str(REPO))
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.splitlines()[-1] == (
        "cst-integrity: error: argument --n-jobs: 0 workers is not possible; give a number "
        "of workers (1 or more), or -1 for all available cores")
    assert not (tmp_path / "out").exists()


@stage(output="y")
def _double(x):
    return 2 * x


def test_log_tells_computed_from_cached_steps(tmp_path, caplog):
    """One line per step, for each plugin: first run computed, rerun cached, and a step that
    always runs (``overwrite``) computed every time."""
    for plugin in ("Linear", "MultiProc"):
        outcomes = []
        for _ in range(2):
            wf = pe.Workflow(name="steps", base_dir=str(tmp_path / plugin))
            first = stage_node(_double, "first", inputs={"x": 1})
            again = stage_node(_double, "again", overwrite=True)
            wf.connect(first, "y", again, "x")
            progress = _Progress(2)
            with caplog.at_level(logging.INFO, logger="cst"):
                run_workflow(wf, plugin=plugin, plugin_args={}, n_procs=1,
                             status_callback=progress)
            outcomes.append((sorted(progress.computed), sorted(progress.cached)))
        assert outcomes == [(["steps.again", "steps.first"], []),
                            (["steps.again"], ["steps.first"])], plugin
        # the rerun's timings: the computed step has its seconds, the cached one none
        # under MultiProc (never started) and its (short) lookup under Linear
        timings = tmp_path / f"{plugin}_steps.tsv"
        progress.write_timings(timings)
        rows = [line.split("\t") for line in timings.read_text().splitlines()]
        assert rows[0] == ["step", "outcome", "seconds"]
        by_step = {step: (outcome, seconds) for step, outcome, seconds in rows[1:]}
        assert by_step["steps.again"][0] == "computed"
        assert 0 <= float(by_step["steps.again"][1]) < 60
        assert by_step["steps.first"][0] == "cached"
    assert "step steps.first: cached" in caplog.text
    assert "step steps.first: computed" in caplog.text


def test_lock_file_goes_with_the_run_and_a_held_lock_refuses(tmp_path):
    work = tmp_path / "work"
    with subject_lock(work, "01"):
        assert (work / "sub-01.lock").is_file()
        with pytest.raises(BusyError, match="Another run is processing sub-01"):
            with subject_lock(work, "01"):
                pass
    assert not work.exists()  # the lock file went, and the folder it left empty
    # A run that opened the file before its holder removed it locks the new one instead.
    work.mkdir()
    stale = open(work / "sub-02.lock", "a")
    fcntl.flock(stale, fcntl.LOCK_EX)
    (work / "sub-02.lock").unlink()
    with subject_lock(work, "02"):
        assert (work / "sub-02.lock").is_file()
        (work / "slurm-array").mkdir()
    stale.close()
    assert sorted(p.name for p in work.iterdir()) == ["slurm-array"]  # a folder not empty stays


def test_removing_a_subjects_work_keeps_the_rest(tmp_path):
    work = tmp_path / "work"
    for label in ("01", "02"):
        (subject_work_dir(work, label) / "node").mkdir(parents=True)
    (work / "slurm-array" / "exit").mkdir(parents=True)
    remove_subject_work(work, "01")
    assert sorted(p.name for p in work.iterdir()) == ["single_subject_wf_02", "slurm-array"]
    remove_subject_work(work, "03")  # nothing of it there
    assert sorted(p.name for p in work.iterdir()) == ["single_subject_wf_02", "slurm-array"]
