"""scripts/slurm_array.py without a cluster: the memory each task asks for (its --dry-run
prints the batch script). CI's SLURM stage (.ci/slurm_stage.sh) submits it for real."""

import importlib.util
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.memory import estimated_memory_bytes

REPO = Path(__file__).resolve().parents[1]

#: Series of each participant (shape, one per run): sub-03 has two runs to combine.
SERIES = {"01": [(16, 16, 12, 13)], "02": [(128, 128, 70, 120)],
          "03": [(96, 96, 60, 33), (96, 96, 60, 33)]}


@pytest.fixture(scope="module")
def slurm_array():
    spec = importlib.util.spec_from_file_location("slurm_array",
                                                  REPO / "scripts" / "slurm_array.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """The participants of :data:`SERIES`, int16 headers only: the estimate reads no voxel."""
    root = tmp_path_factory.mktemp("bids")
    for label, shapes in SERIES.items():
        dwi = root / f"sub-{label}" / "dwi"
        dwi.mkdir(parents=True)
        for direction, shape in zip(("AP", "PA"), shapes):
            stem = dwi / f"sub-{label}_dir-{direction}_dwi"
            header = nib.Nifti1Header()
            header.set_data_shape(shape)
            header.set_data_dtype(np.int16)
            Path(f"{stem}.nii").write_bytes(header.binaryblock + bytes(4))
            for suffix in (".bval", ".bvec"):
                Path(f"{stem}{suffix}").touch()
    return root


def _expected_mem(shapes, cpus, memory_bytes=None):
    """What the task should ask for: the largest estimate, 1 GiB more, in whole GiB."""
    largest = max(estimated_memory_bytes(s, input_itemsize=2, n_jobs=cpus,
                                         memory_bytes=memory_bytes) for s in shapes)
    return f"{math.ceil(largest / 2 ** 30 + 1)}G"


def _dry_run(slurm_array, bids, tmp_path, capsys, *argv):
    assert slurm_array.main([str(bids), str(tmp_path / "out"), "--dry-run",
                             "--cst-integrity", sys.executable, *argv]) == 0
    return capsys.readouterr().out


def test_tasks_ask_for_the_estimate_of_the_largest_series(slurm_array, bids, tmp_path, capsys):
    shapes = [s for series in SERIES.values() for s in series]
    out = _dry_run(slurm_array, bids, tmp_path, capsys, "--cpus", "2")
    assert f"#SBATCH --mem={_expected_mem(shapes, 2)}\n" in out
    assert "--mem=6G" in out  # sub-02, 4.5 GiB
    out = _dry_run(slurm_array, bids, tmp_path, capsys, "--cpus", "4",
                   "--participant-label", "01")
    assert f"#SBATCH --mem={_expected_mem(SERIES['01'], 4)}\n" in out
    # the user's --mem wins
    out = _dry_run(slurm_array, bids, tmp_path, capsys, "--mem", "10G")
    assert "#SBATCH --mem=10G\n" in out and "memory per task" not in out


def test_the_estimate_follows_the_options_the_tasks_run_with(slurm_array, bids, tmp_path):
    """Combined runs are one series with all their volumes; a --mem-gb budget makes the
    denoising's chunks, and so the estimate, smaller."""
    def mem(*extra):
        args = slurm_array.parse_arguments([str(bids), str(tmp_path), "--", *extra])
        return slurm_array.estimated_task_memory(args, ["03"])

    assert mem() == _expected_mem(SERIES["03"], 2) == "3G"
    assert mem("--combine-runs") == _expected_mem([(96, 96, 60, 66)], 2) == "5G"
    assert mem("--combine-runs", "--mem-gb", "2") == _expected_mem(
        [(96, 96, 60, 66)], 2, memory_bytes=2 * 2 ** 30) == "4G"


def test_without_the_pipeline_tasks_ask_for_8g(slurm_array, bids, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.memory", None)  # the import fails
    out = _dry_run(slurm_array, bids, tmp_path, capsys)
    assert "#SBATCH --mem=8G\n" in out and "no estimate" in out
