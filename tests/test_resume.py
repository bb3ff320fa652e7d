"""A run killed with SIGKILL at any stage, then rerun, ends with the outputs of an
uninterrupted run; a killed run never leaves outputs that look complete. A rerun takes from
the work folder every step that finished, whatever ``--n-jobs`` each run had; a successful
run removes the folder unless ``--keep-work``, and a rerun of complete outputs computes
nothing."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

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


def _step_outcomes(out):
    """{step name: "computed" | "cached" | "FAILED"} from the newest run log in ``out``."""
    logs = sorted((out / "sub-subject01" / "log").glob("*.log"), key=os.path.getmtime)
    outcomes = {}
    for line in logs[-1].read_text().splitlines():
        if " cst INFO: step " in line:
            name, _, outcome = line.split(" cst INFO: step ", 1)[1].rpartition(": ")
            outcomes[name.rsplit(".", 1)[-1]] = outcome
    return outcomes


def _output_bytes(out):
    """Every output file of the run (not the logs) → its bytes."""
    files = [out / f"{STEM}.html", *sorted((out / "sub-subject01" / "dwi").iterdir())]
    return {path.name: path.read_bytes() for path in files}


def _content(name, data):
    """What an output file holds, without what writing it again changes: the time in a gzip
    header or a zip (TRX) entry, and the sidecars' n_jobs (of the run that wrote them)."""
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".trx"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {member: archive.read(member) for member in archive.namelist()}
    if name.endswith(".json") and not name.endswith("_metrics.json"):
        sidecar = json.loads(data)
        sidecar.get("Parameters", {}).pop("n_jobs", None)
        return sidecar
    return data


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

    # Another --n-jobs: it does not change results, so it invalidates no cached step.
    result = run_cst_report("subject01", bids, out, "--n-jobs", "1", "--keep-work")
    assert result.returncode == 0, result.stderr
    outcomes = _step_outcomes(out)
    after_last_kill = {"report", "write_derivatives"}
    assert {k: v for k, v in outcomes.items() if k not in after_last_kill} == \
        dict.fromkeys(set(outcomes) - after_last_kill, "cached")
    assert {outcomes[k] for k in after_last_kill} == {"computed"}
    assert (out / ".cst-work" / RUN_WF).is_dir()  # kept, as asked
    # Byte-identical metrics apart from the creation time.
    assert _metrics_bytes_without_timestamp(out) == _metrics_bytes_without_timestamp(reference)
    assert load_metrics(out, STEM)["localization"]["affected_side"] == "left"
    for name in (f"{STEM}_desc-profiles_tractometry.tsv",):
        assert (out / "sub-subject01" / "dwi" / name).read_bytes() == \
            (reference / "sub-subject01" / "dwi" / name).read_bytes()
    assert_same_tractograms(out, reference)
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"

    # The outputs made incomplete (as by a kill while they were copied): a rerun, with yet
    # another --n-jobs, only copies the cached results again, and removes the work folder.
    before = _output_bytes(out)
    metrics_file.unlink()
    result = run_cst_report("subject01", bids, out, "--n-jobs", "2")
    assert result.returncode == 0, result.stderr
    outcomes = _step_outcomes(out)
    assert {k for k, v in outcomes.items() if v == "computed"} == {"write_derivatives"}
    after = _output_bytes(out)
    assert after.keys() == before.keys()
    assert after[metrics_file.name] == before[metrics_file.name]  # the cached assessment
    assert [k for k in before if _content(k, after[k]) != _content(k, before[k])] == []
    assert not (out / ".cst-work").exists()

    # Complete outputs for the same inputs and settings: nothing to compute at all.
    result = run_cst_report("subject01", bids, out, "--n-jobs", "1")
    assert result.returncode == 0, result.stderr
    assert "nothing recomputed" in result.stdout and _step_outcomes(out) == {}
    assert _output_bytes(out) == after
    assert not (out / ".cst-work").exists()
