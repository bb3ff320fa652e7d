"""Shared fixtures: running the command line, and the real scans in ../shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BIDS = Path(os.environ.get("CST_SHARED_BIDS", REPO.parent / "shared" / "data" / "bids"))


def run_cst_report(subject, bids_dir, out_dir, *extra, work_dir=None):
    """Run ``cst-report`` in a fresh process, as a user would; return the CompletedProcess."""
    args = [sys.executable, "-c", "from workflows.cli import cst_report_main; cst_report_main()",
            subject, "--bids-dir", str(bids_dir), "--out-dir", str(out_dir), *extra]
    if work_dir is not None:
        args += ["--work-dir", str(work_dir)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=1800)


def load_metrics(out_dir, stem):
    subject = stem.split("_")[0]
    return json.loads((Path(out_dir) / subject / "dwi" / f"{stem}_desc-cst_metrics.json").read_text())


def pytest_collection_modifyitems(config, items):
    if SHARED_BIDS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real scans not found at {SHARED_BIDS}")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)
