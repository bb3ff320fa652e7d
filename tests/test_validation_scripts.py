"""The validation scripts' own rules: which half a subject is in, and who is the same person."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_volunteers_follow_the_participants_notes(tmp_path):
    """Leave-one-volunteer-out needs repeated scans of one person grouped together."""
    fit = _script("fit_healthy_asymmetry")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "participants.tsv").write_text(
        "participant_id\tnotes\n"
        "sub-toshiba01\t1 b0 + 12 DW\n"
        "sub-toshiba02\t3 mm; same volunteer and session as sub-toshiba01\n"
        "sub-siemens05\tPRONE (HFP); same volunteer as sub-siemens04\n"
        "sub-philips01\t\n")
    volunteer_of = fit.volunteers([tmp_path / "a", tmp_path / "missing"])
    assert volunteer_of == {"toshiba01": "toshiba01", "toshiba02": "toshiba01",
                            "siemens05": "siemens04", "philips01": "philips01"}


def test_split_halves_keep_the_tuning_subjects_out_of_the_report():
    validate = _script("validate_lesions")
    tune = set(validate.SPLIT["tune"])
    report = set(validate.SPLIT["report"])
    assert not tune & report
    assert all(validate.split_of(label) == "tune" for label in tune)
    assert all(validate.split_of(label) == "report" for label in report)


def test_compare_outputs_tells_a_changed_result_from_a_changed_time(tmp_path):
    """scripts/compare_outputs.py (the byte-identity check of refactors, and CI's local
    versus SLURM check): equal folders pass, a new creation time is ignored, one changed
    voxel, streamline point or profile value fails, and --results-only ignores the rest."""
    import json

    import nibabel as nib
    import numpy as np

    compare = _script("compare_outputs")
    stem = "sub-01/dwi/sub-01"

    def make(root, created="2026-01-01T00:00:00", fa_value=0.5, point=0.0, fa_row="0.5"):
        (root / "sub-01" / "dwi").mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.full((2, 2, 2), fa_value, np.float32), np.eye(4)),
                 str(root / f"{stem}_model-tensor_param-fa_dwimap.nii.gz"))
        (root / f"{stem}_desc-cst_metrics.json").write_text(json.dumps(
            {"cst": {"fa": 0.5}, "provenance": {"created": created, "path": str(root)}}))
        (root / f"{stem}_desc-profiles_tractometry.tsv").write_text(f"node\tfa\n0\t{fa_row}\n")
        tractogram = nib.streamlines.Tractogram(
            [np.array([[point, 0, 0], [1, 1, 1]], np.float32)], affine_to_rasmm=np.eye(4))
        nib.streamlines.save(tractogram, str(root / f"{stem}_hemi-L_desc-CST_tractography.trk"),
                             header={"dimensions": (2, 2, 2), "voxel_sizes": (1, 1, 1),
                                     "voxel_to_rasmm": np.eye(4)})
        return root

    reference = make(tmp_path / "a")
    assert compare.main([str(reference), str(make(tmp_path / "b", created="2027"))]) == 0
    for name, change in (("voxel", {"fa_value": 0.6}), ("point", {"point": 0.001}),
                         ("profile", {"fa_row": "0.51"})):
        assert compare.main([str(reference), str(make(tmp_path / name, **change))]) == 1, name
    assert compare.main(["--results-only", str(reference), str(tmp_path / "voxel")]) == 0
    assert compare.main(["--results-only", str(reference), str(tmp_path / "point")]) == 1
