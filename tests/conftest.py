"""Shared fixtures: running the command line, and the real scans in ../shared."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import EXIT_NOT_ASSESSABLE
from pipeline.sims.phantom import make_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_BIDS = Path(os.environ.get("CST_SHARED_BIDS", REPO.parent / "shared" / "data" / "bids"))
SHARED_CLINICAL = SHARED_BIDS.with_name("bids-clinical")


@pytest.fixture(autouse=True)
def always_parallel(monkeypatch):
    """In-process tests send even small work to the workers, so that comparisons of
    n_jobs really compare serial with parallel runs (the command line keeps its
    measured-cost rule, :data:`pipeline.parallel.WORKER_START_SECONDS`)."""
    import pipeline.parallel

    monkeypatch.setattr(pipeline.parallel, "WORKER_START_SECONDS", 0.0)


def cst_report_env():
    """The environment of a ``cst-report`` process started by a test: this one's, as the
    test may have set it, without Python's warnings."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def cst_report_command(subject, bids_dir, out_dir, *extra):
    """The command line of ``cst-report``, run by this Python as a user would run it."""
    return [sys.executable, "-c", "from workflows.cli import cst_report_main; cst_report_main()",
            subject, "--bids-dir", str(bids_dir), "--out-dir", str(out_dir), *extra]


def run_cst_report(subject, bids_dir, out_dir, *extra, work_dir=None):
    """Run ``cst-report`` in a fresh process, as a user would; return the CompletedProcess."""
    if work_dir is not None:
        extra = (*extra, "--work-dir", str(work_dir))
    return subprocess.run(cst_report_command(subject, bids_dir, out_dir, *extra),
                          capture_output=True, text=True, env=cst_report_env(), cwd=str(REPO),
                          timeout=1800)


def assert_same_tractograms(out_a, out_b, stem="sub-subject01"):
    """Both CST tractograms of two output folders hold identical streamlines, in order."""
    import nibabel as nib
    import numpy as np

    subject = stem.split("_")[0]
    for hemi in ("L", "R"):
        name = f"{subject}/dwi/{stem}_hemi-{hemi}_desc-CST_tractography.trk"
        a = nib.streamlines.load(str(Path(out_a) / name)).streamlines
        b = nib.streamlines.load(str(Path(out_b) / name)).streamlines
        assert len(a) == len(b) > 0
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def load_metrics(out_dir, stem):
    subject = stem.split("_")[0]
    return json.loads(
        (Path(out_dir) / subject / "dwi" / f"{stem}_desc-cst_metrics.json").read_text())


PHANTOM_LESION = {"side": "left", "level": "internal_capsule", "radius_mm": 6.0, "fa_drop": 0.5}
PHANTOM_STEM = "sub-subject01"
#: Bedside scores given to the lesion phantom's participant (a severe stroke: PREP2 'Poor').
PHANTOM_CLINICAL = {"age": 67.0, "safe_score": 3.0, "mep_status": "negative", "nihss": 9.0}


@pytest.fixture(scope="session")
def lesion_phantom(tmp_path_factory):
    """The demo phantom (left internal-capsule lesion) as a BIDS dataset, and its ground truth.

    Its participants.tsv carries the PREP2 columns (:data:`PHANTOM_CLINICAL`).
    """
    bids = tmp_path_factory.mktemp("lesion") / "bids"
    truth = make_phantom_dataset(bids, subject="subject01", lesion=PHANTOM_LESION, seed=0)
    columns = ["participant_id", *PHANTOM_CLINICAL]
    values = ["sub-subject01", *(str(v) for v in PHANTOM_CLINICAL.values())]
    (bids / "participants.tsv").write_text("\t".join(columns) + "\n" + "\t".join(values) + "\n")
    return bids, truth


@pytest.fixture(scope="session")
def lesion_run(lesion_phantom, tmp_path_factory):
    """One uninterrupted ``cst-report --n-jobs 2`` of the lesion phantom: (out, truth, result)."""
    bids, truth = lesion_phantom
    out = tmp_path_factory.mktemp("lesion_out")
    result = run_cst_report("subject01", bids, out, "--n-jobs", "2")
    assert result.returncode == 0, result.stderr
    return out, truth, result


#: The third phantom of :func:`three_subjects_at_once`: another side and level than the demo's.
RIGHT_PEDUNCLE_LESION = {"side": "right", "level": "cerebral_peduncle", "radius_mm": 6.0,
                         "fa_drop": 0.5}


@pytest.fixture(scope="session")
def three_subjects_at_once(lesion_phantom, tmp_path_factory):
    """Three ``cst-report`` processes started at once, writing into one output folder:

    - ``subject01``: the demo phantom of :func:`lesion_phantom` (a copy of its files), to
      compare with :func:`lesion_run`'s two jobs;
    - ``subject02``: a lesion-free phantom (another noise seed);
    - ``subject03``: a lesion in the right cerebral peduncle.

    Each runs with ``--n-jobs 1``: three processes share the machine's cores.

    One run of each serves the tests of concurrency, of ``n_jobs`` and of the lesion-free
    phantom (each is a whole pipeline run, the suite's costliest unit).
    Returns ``(out, {label: CompletedProcess}, {label: ground truth})``.
    """
    demo_bids, demo_truth = lesion_phantom
    bids = tmp_path_factory.mktemp("three") / "bids"
    shutil.copytree(demo_bids, bids)
    truths = {"subject01": demo_truth}
    scratch = tmp_path_factory.mktemp("three-scratch")
    for label, lesion, seed in (("subject02", None, 1), ("subject03", RIGHT_PEDUNCLE_LESION, 2)):
        truths[label] = make_phantom_dataset(scratch, subject=label, lesion=lesion, seed=seed)
        shutil.copytree(scratch / f"sub-{label}", bids / f"sub-{label}")
    out = tmp_path_factory.mktemp("three-out")
    processes = {
        label: subprocess.Popen(cst_report_command(label, bids, out, "--n-jobs", "1"),
                                cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=cst_report_env())
        for label in truths}
    results = {}
    for label, process in processes.items():
        stdout, stderr = process.communicate(timeout=1800)
        results[label] = subprocess.CompletedProcess(process.args, process.returncode,
                                                     stdout, stderr)
    return out, results, truths


@pytest.fixture(scope="session")
def real_scan_run(tmp_path_factory):
    """``cst-report --n-jobs 2`` of a shared real scan, run once per session for every test
    that reads it: ``run(subject, bids=SHARED_BIDS)`` → its output folder (the run ended
    with an assessment, or as not assessable).

    With ``CST_TEST_RUNS_DIR`` set, the runs of ``SHARED_BIDS`` are kept there, in a
    folder per subject: CI's SLURM stage (``.ci/slurm_stage.sh``) takes them as the local
    runs its SLURM runs must equal, rather than computing them again.
    """
    outputs = {}
    kept = os.environ.get("CST_TEST_RUNS_DIR")

    def run(subject, bids=SHARED_BIDS):
        if (subject, bids) not in outputs:
            if kept and bids == SHARED_BIDS:
                out = Path(kept) / subject
                out.mkdir(parents=True, exist_ok=True)
            else:
                out = tmp_path_factory.mktemp(f"real-{subject}")
            result = run_cst_report(subject, bids, out, "--n-jobs", "2")
            assert result.returncode in (0, EXIT_NOT_ASSESSABLE), result.stderr
            outputs[subject, bids] = out
        return outputs[subject, bids]

    return run


def pytest_collection_modifyitems(config, items):
    if SHARED_BIDS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real scans not found at {SHARED_BIDS}")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)
