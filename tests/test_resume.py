"""A run killed with SIGKILL at any stage, then rerun, ends with the outputs of an
uninterrupted run; a killed run never leaves outputs that look complete."""

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import PHANTOM_STEM as STEM
from .conftest import REPO, assert_same_tractograms, load_metrics, run_cst_report

pytestmark = pytest.mark.slow

RUN_WF = "single_subject_wf_subject01/sub_subject01_wf"
# Nodes during which the run is killed, in pipeline order.
KILL_DURING = ("dwi_preproc_wf/dwi_correct_wf/correct_motion", "cst_wf/register_atlas", "report")


def _start(bids, out):
    args = [sys.executable, "-c", "from workflows.cli import cst_report_main; cst_report_main()",
            "subject01", "--bids-dir", str(bids), "--out-dir", str(out), "--n-jobs", "2"]
    return subprocess.Popen(args, cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_when_started(process, node_dir, timeout=900):
    """SIGKILL the whole process group shortly after ``node_dir`` appears (the node started)."""
    deadline = time.monotonic() + timeout
    while not node_dir.exists():
        assert process.poll() is None, f"run ended before {node_dir.name} started"
        assert time.monotonic() < deadline, f"{node_dir.name} never started"
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _metrics_bytes_without_timestamp(out):
    path = out / "sub-subject01" / "dwi" / f"{STEM}_desc-cst_metrics.json"
    lines = path.read_bytes().splitlines(keepends=True)
    assert sum(b'"created":' in line for line in lines) == 1
    return b"".join(line for line in lines if b'"created":' not in line)


def test_killed_three_times_then_resumed_equals_uninterrupted(lesion_phantom, lesion_run, tmp_path):
    bids, _ = lesion_phantom
    reference, _, _ = lesion_run
    out = tmp_path / "out"
    metrics_file = out / "sub-subject01" / "dwi" / f"{STEM}_desc-cst_metrics.json"
    for node in KILL_DURING:
        process = _start(bids, out)
        _kill_when_started(process, out / ".cst-work" / RUN_WF / node)
        assert process.returncode == -signal.SIGKILL
        assert not metrics_file.exists(), f"outputs look complete after a kill during {node}"
        assert not (out / f"{STEM}.html").exists()

    result = run_cst_report("subject01", bids, out, "--n-jobs", "2")
    assert result.returncode == 0, result.stderr
    # Byte-identical metrics apart from the creation time.
    assert _metrics_bytes_without_timestamp(out) == _metrics_bytes_without_timestamp(reference)
    assert load_metrics(out, STEM)["localization"]["affected_side"] == "left"
    for name in (f"{STEM}_desc-profiles_tractometry.tsv",):
        assert (out / "sub-subject01" / "dwi" / name).read_bytes() == \
            (reference / "sub-subject01" / "dwi" / name).read_bytes()
    assert_same_tractograms(out, reference)
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"
