"""Workflow wiring and command-line behaviour that needs no heavy computation."""

import nibabel as nib
import numpy as np
import pytest

from pipeline.bids import find_dwi_runs
from pipeline.errors import EXIT_BAD_INPUT
from workflows.base import init_single_subject_wf
from workflows.cli import build_parameters, cst_report_parser

from .conftest import run_cst_report


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
                                parameters=build_parameters(args))
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
