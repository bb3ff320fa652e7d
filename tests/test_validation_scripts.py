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
