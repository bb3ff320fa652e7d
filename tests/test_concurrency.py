"""Two runs at once: the same subject is refused clearly; different subjects coexist."""

import fcntl
import json
import subprocess
import sys

import pytest

from pipeline.errors import EXIT_BUSY
from pipeline.sims.phantom import make_phantom_dataset

from .conftest import REPO, load_metrics, run_cst_report


def test_same_subject_while_another_run_holds_it_is_refused(lesion_phantom, tmp_path):
    bids, _ = lesion_phantom
    out = tmp_path / "out"
    work = out / ".cst-work"
    work.mkdir(parents=True)
    with open(work / "sub-subject01.lock", "a") as held:  # as a running cst-report holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cst_report("subject01", bids, out)
    assert result.returncode == EXIT_BUSY
    assert "Another run is processing sub-subject01" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "sub-subject01" / "dwi").exists()


@pytest.mark.slow
def test_two_subjects_into_one_output_folder_at_once(tmp_path):
    bids = tmp_path / "bids"
    make_phantom_dataset(bids, subject="subject01", lesion=None, seed=1)
    make_phantom_dataset(bids, subject="subject02",
                         lesion={"side": "right", "level": "cerebral_peduncle",
                                 "radius_mm": 6.0, "fa_drop": 0.5}, seed=2)
    out = tmp_path / "out"
    runs = [subprocess.Popen(
        [sys.executable, "-c", "from workflows.cli import cst_report_main; cst_report_main()",
         subject, "--bids-dir", str(bids), "--out-dir", str(out), "--denoise", "none"],
        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for subject in ("subject01", "subject02")]
    for run in runs:
        _, stderr = run.communicate(timeout=1200)
        assert run.returncode == 0, stderr
    json.loads((out / "dataset_description.json").read_text())
    healthy = load_metrics(out, "sub-subject01")
    lesioned = load_metrics(out, "sub-subject02")
    assert healthy["subject"] == "subject01" and healthy["localization"]["umn_damage"] is False
    assert lesioned["subject"] == "subject02"
    assert lesioned["localization"]["affected_side"] == "right"
    assert lesioned["localization"]["level"] == "cerebral_peduncle"
    for label in ("subject01", "subject02"):
        assert len(list((out / f"sub-{label}" / "log").glob("*.log"))) == 1
