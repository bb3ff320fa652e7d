"""Runs at once: the same subject is refused clearly; different subjects coexist."""

import fcntl
import json

import pytest

from pipeline.errors import EXIT_BUSY

from .conftest import load_metrics, run_cst_report


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
def test_three_subjects_into_one_output_folder_at_once(three_subjects_at_once):
    out, results, truths = three_subjects_at_once
    for label, result in results.items():
        assert result.returncode == 0, (label, result.stderr)
    json.loads((out / "dataset_description.json").read_text())
    for label, truth in truths.items():
        metrics = load_metrics(out, f"sub-{label}")
        assert metrics["subject"] == label
        found = metrics["localization"]
        if truth["lesion"] is None:
            assert found["umn_damage"] is False and found["affected_side"] == "none"
        else:
            assert found["affected_side"] == truth["lesion"]["side"]
            assert found["level"] == truth["lesion"]["level"]
        assert len(list((out / f"sub-{label}" / "log").glob("*.log"))) == 1
