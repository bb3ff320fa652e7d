"""The outputs in other tools: the BIDS validator, AFQ-Insight, trx-python, DIPY and MRtrix3.

The demo run (``lesion_run``) is read by each of them; the validator also checks the outputs
of a real scan (sub-philips01). Tools that are not in the test environment are skipped when
absent, except under CI (environment variable ``CI`` set), which installs them: the
validator (``bids-validator-deno``, in the ``[test]`` extra) and AFQ-Insight, which pins old
numpy, scipy, pandas and scikit-learn and so lives in its own environment, whose Python
``CST_AFQINSIGHT_PYTHON`` names (``.ci/run`` makes it). MRtrix3 (Debian ``mrtrix3``) is
skipped whenever ``mrinfo`` is absent.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import atlases
from pipeline.io.profiles_table import write_profile_tables
from tests.conftest import PHANTOM_CLINICAL, PHANTOM_STEM, load_metrics

DWI = Path("sub-subject01") / "dwi"


def _tool_or_skip(path, message):
    """``path``, or skip (fail under CI, which installs the tool) when it is None."""
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


def _read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _validate(out_dir):
    """Run the BIDS validator on ``out_dir``; print its warnings, return its errors."""
    # The venv's bin folder first: pytest may run without the venv on PATH.
    beside = Path(sys.executable).parent / "bids-validator-deno"
    validator = _tool_or_skip(str(beside) if beside.exists() else shutil.which(
        "bids-validator-deno"), "bids-validator-deno is not installed (pip install "
        "bids-validator-deno)")
    result = subprocess.run([validator, str(out_dir), "--format", "json"], capture_output=True,
                            text=True, timeout=600)
    assert result.stdout.strip(), result.stderr  # a report, also when the dataset is invalid
    issues = json.loads(result.stdout)["issues"]["issues"]
    for issue in issues:
        if issue["severity"] != "error":
            print(f"validator {issue['severity']}: {issue['code']} {issue.get('location', '')}")
    return [issue for issue in issues if issue["severity"] == "error"]


def test_demo_outputs_are_valid_bids_derivatives(lesion_run, lesion_phantom):
    out, _, _ = lesion_run
    bids, _ = lesion_phantom
    # The group level's files too (the group table and page).
    group = subprocess.run(
        [sys.executable, "-c", "from workflows.cli import bids_app_main; bids_app_main()",
         str(bids), str(out), "group"], capture_output=True, text=True)
    assert group.returncode == 0, group.stderr
    assert _validate(out) == []


@pytest.mark.realdata
@pytest.mark.slow
def test_real_scan_outputs_are_valid_bids_derivatives(real_scan_run):
    out = real_scan_run("philips01")  # also read by tests/test_real_scans.py
    assert load_metrics(out, "sub-philips01")["qc"]["assessable"]
    assert _validate(out) == []


def test_images_keep_the_inputs_space_with_units(lesion_run, lesion_phantom):
    out, _, _ = lesion_run
    bids, _ = lesion_phantom
    source = nib.load(str(bids / DWI / f"{PHANTOM_STEM}_dwi.nii.gz"))
    code = int(source.header["sform_code"])
    images = sorted((out / DWI).glob("*.nii.gz"))
    assert len(images) == 6
    for path in images:
        header = nib.load(str(path)).header
        assert header.get_xyzt_units()[0] == "mm", path.name
        assert (int(header["qform_code"]), int(header["sform_code"])) == (code, code), path.name
        assert np.allclose(header.get_qform(), header.get_sform(), atol=1e-4), path.name
        assert np.allclose(header.get_sform(), source.affine, atol=1e-4), path.name
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SpatialReference"] == f"bids:raw:{DWI.as_posix()}/{PHANTOM_STEM}_dwi.nii.gz"


def test_roi_segmentation_has_its_label_table(lesion_run):
    out, _, _ = lesion_run
    dseg = out / DWI / f"{PHANTOM_STEM}_desc-CSTrois_dseg.nii.gz"
    table = _read_tsv(dseg.with_name(dseg.name.replace(".nii.gz", ".tsv")))
    assert {r["abbreviation"]: int(r["index"]) for r in table} == atlases.CST_ROI_LABELS
    assert len({r["name"] for r in table}) == len(table)
    labels = set(np.unique(np.asarray(nib.load(str(dseg)).dataobj))) - {0}
    assert labels and labels <= {int(r["index"]) for r in table}


def test_sidecars_name_their_sources_by_bids_uri(lesion_run, lesion_phantom):
    out, _, _ = lesion_run
    bids, _ = lesion_phantom
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    assert Path(links["raw"].removeprefix("file://")).resolve() == bids.resolve()
    sidecars = sorted((out / DWI).glob("*.json"))
    sidecars.remove(out / DWI / f"{PHANTOM_STEM}_desc-cst_metrics.json")  # data, not a sidecar
    assert len(sidecars) == 9
    for path in sidecars:
        sidecar = json.loads(path.read_text())
        assert isinstance(sidecar["SoftwareVersions"], str)
        assert len(sidecar["Sources"]) == 3
        for source in sidecar["Sources"]:
            assert source.startswith("bids:raw:"), (path.name, source)
            assert (bids / source.removeprefix("bids:raw:")).is_file()


#: Reads the profiles CSVs with AFQ-Insight (in its own environment); prints what it got.
AFQ_INSIGHT_READ = """
import json, sys
from afqinsight import load_afq_data
one, two, participants = sys.argv[1:]
single = load_afq_data(fn_nodes=one, fn_subjects=participants, index_col="participant_id",
                       target_cols=["age"])
runs = load_afq_data(fn_nodes=two, unsupervised=True, concat_subject_session=True)
print(json.dumps({"X": single.X.tolist(), "y": float(single.y), "subjects": single.subjects,
                  "features": [list(map(str, f)) for f in single.feature_names],
                  "runs": runs.subjects, "runs_shape": list(runs.X.shape)}))
"""


def test_profiles_load_in_afq_insight(lesion_run, lesion_phantom, tmp_path):
    python = _tool_or_skip(os.environ.get("CST_AFQINSIGHT_PYTHON"),
                           "CST_AFQINSIGHT_PYTHON does not name a Python with afqinsight")
    out, _, _ = lesion_run
    bids, _ = lesion_phantom
    tsv = out / DWI / f"{PHANTOM_STEM}_desc-profiles_tractometry.tsv"
    rows = _read_tsv(tsv)
    # Two runs of one subject (as sub-siemens03's dir-AP and dir-PA), written as the
    # pipeline writes each run's tables, then concatenated as for a group analysis.
    parts = []
    for direction in ("AP", "PA"):
        written = write_profile_tables(tsv, tmp_path / direction / tsv.name,
                                       f"{PHANTOM_STEM}_dir-{direction}")
        parts.append(Path(written[1]).read_text().splitlines())
    both = tmp_path / "both.csv"
    both.write_text("\n".join(parts[0] + parts[1][1:]) + "\n")

    result = subprocess.run([python, "-c", AFQ_INSIGHT_READ,
                             str(tsv.with_suffix(".csv")), str(both),
                             str(bids / "participants.tsv")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.splitlines()[-1])
    assert got["subjects"] == [PHANTOM_STEM] and got["y"] == PHANTOM_CLINICAL["age"]
    # One feature per metric, tract and node, with our values.
    expected = {(f"dti_{m}", r["tractID"], r["nodeID"]): float(r[m]) if r[m] != "n/a" else None
                for r in rows for m in ("fa", "md", "rd", "ad")}
    assert {t for _, t, _ in expected} == {"Left Corticospinal", "Right Corticospinal"}
    values = dict(zip(map(tuple, got["features"]), got["X"][0]))
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        if value is not None:  # AFQ-Insight interpolates along the tract where we have n/a
            assert values[key] == pytest.approx(value, abs=1e-9), key
    # The two runs stay two samples, told apart by sessionID.
    assert got["runs"] == [f"{PHANTOM_STEM}dir-AP", f"{PHANTOM_STEM}dir-PA"]
    assert got["runs_shape"] == [2, 800]
    run_rows = _read_tsv(tmp_path / "AP" / tsv.name)
    assert {(r["sessionID"], r["run"]) for r in run_rows} == {("dir-AP",
                                                               f"{PHANTOM_STEM}_dir-AP")}
    assert {r["tract"] for r in run_rows} == {"CST_L", "CST_R"}


def test_tractograms_load_in_trx_python_and_dipy(lesion_run):
    from dipy.io.streamline import load_tractogram
    from trx.trx_file_memmap import load as load_trx

    out, _, _ = lesion_run
    fa = out / DWI / f"{PHANTOM_STEM}_model-tensor_param-fa_dwimap.nii.gz"
    fa_img = nib.load(str(fa))
    for hemi in ("L", "R"):
        trk = out / DWI / f"{PHANTOM_STEM}_hemi-{hemi}_desc-CST_tractography.trk"
        world = nib.streamlines.load(str(trk)).streamlines
        assert len(world) > 0
        trx = load_trx(str(trk.with_suffix(".trx")))
        try:
            assert np.allclose(trx.header["VOXEL_TO_RASMM"], fa_img.affine, atol=1e-4)
            assert tuple(trx.header["DIMENSIONS"]) == fa_img.shape
            assert len(trx.streamlines) == len(world)
            assert np.allclose(trx.streamlines._data, world.get_data(), atol=1e-4)
        finally:
            trx.close()
        for path, reference in ((trk, str(fa)), (trk.with_suffix(".trx"), "same")):
            sft = load_tractogram(str(path), reference, bbox_valid_check=True)
            sft.to_rasmm()
            assert len(sft) == len(world)
            assert np.allclose(sft.streamlines.get_data(), world.get_data(), atol=1e-4)


def test_mrtrix_reads_the_maps_and_tracts(lesion_run, tmp_path):
    if shutil.which("mrinfo") is None:
        pytest.skip("MRtrix3 is not installed (apt-get install mrtrix3)")
    out, _, _ = lesion_run
    fa = out / DWI / f"{PHANTOM_STEM}_model-tensor_param-fa_dwimap.nii.gz"
    fa_img = nib.load(str(fa))

    def mrtrix(*args):
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        # MRtrix3 warns when a header is inconsistent (e.g. a qform unlike the sform).
        assert "warning" not in result.stderr.lower(), result.stderr
        return result.stdout.split()

    assert [int(v) for v in mrtrix("mrinfo", "-size", str(fa))] == list(fa_img.shape)
    assert np.allclose([float(v) for v in mrtrix("mrinfo", "-spacing", str(fa))],
                       fa_img.header.get_zooms())
    fa_data = fa_img.get_fdata()
    for hemi in ("L", "R"):
        trk = out / DWI / f"{PHANTOM_STEM}_hemi-{hemi}_desc-CST_tractography.trk"
        streamlines = nib.streamlines.load(str(trk)).streamlines
        tck = tmp_path / f"{hemi}.tck"
        nib.streamlines.save(nib.streamlines.Tractogram(streamlines, affine_to_rasmm=np.eye(4)),
                             str(tck))
        assert mrtrix("tckinfo", "-count", str(tck))[-1] == str(len(streamlines))
        # FA at every point of every streamline, MRtrix3's trilinear sampling against
        # ours: the two agree only if MRtrix3 places the map and the tracts where we do.
        sampled = tmp_path / f"{hemi}_fa.txt"
        mrtrix("tcksample", str(tck), str(fa), str(sampled))
        theirs = [np.array(line.split(), dtype=float) for line in
                  sampled.read_text().splitlines() if not line.startswith("#")]
        inverse = np.linalg.inv(fa_img.affine)
        assert len(theirs) == len(streamlines)
        for points, values in zip(streamlines, theirs):
            ours = ndimage.map_coordinates(fa_data, nib.affines.apply_affine(inverse, points).T,
                                           order=1)
            assert np.allclose(values, ours, atol=1e-5)
