"""PREP2 (Stinear et al. 2017) on bedside scores, and reading them from participants.tsv."""

import math

import pytest

from pipeline.clinical.participants import read_clinical_scores
from pipeline.clinical.prognosis import prep2_prediction, prognosis_summary
from pipeline.errors import InputError

NO_DAMAGE = {"assessable": True, "umn_damage": False}
NOT_ASSESSABLE = {"assessable": False, "umn_damage": None}
LEFT_DAMAGE = {"assessable": True, "umn_damage": True, "affected_side": "left",
               "level": "internal_capsule"}


def _scores(safe=None, age=None, mep=None, nihss=None):
    return {"safe_score": safe, "age": age, "mep_status": mep, "nihss": nihss}


@pytest.mark.parametrize("scores, prediction, missing", [
    # Step 1, SAFE >= 5: Excellent below 80 years; from 80, Excellent only with SAFE >= 8.
    (_scores(safe=5, age=79.9), "Excellent", []),
    (_scores(safe=7, age=80), "Good", []),
    (_scores(safe=8, age=91), "Excellent", []),
    (_scores(safe=10), "Excellent", []),           # age does not matter from SAFE 8
    (_scores(safe=6), None, ["age"]),              # ... but it does below
    # Step 2, SAFE < 5: MEP+ -> Good, whatever the NIHSS.
    (_scores(safe=4.9, age=50, mep="positive", nihss=20), "Good", []),
    (_scores(safe=0, mep=None, nihss=3), None, ["mep_status"]),
    # Step 3, MEP-: NIHSS < 7 -> Limited, NIHSS >= 7 -> Poor.
    (_scores(safe=2, mep="negative", nihss=6), "Limited", []),
    (_scores(safe=2, mep="negative", nihss=7), "Poor", []),
    (_scores(safe=2, mep="negative"), None, ["nihss"]),
    # No SAFE score: PREP2 cannot start.
    (_scores(age=60, mep="negative", nihss=12), None, ["safe_score"]),
])
def test_every_branch_of_the_tree(scores, prediction, missing):
    result = prep2_prediction(scores)
    assert result["prediction"] == prediction
    assert result["missing"] == missing
    assert "doi:10.1002/acn3.488" in result["source"]
    if prediction is not None:
        assert prediction in result["steps"][-1]   # the last decision names the tier
    # every step quotes the score it used against its cut-off
    assert all(any(ch.isdigit() for ch in step) or "MEP" in step for step in result["steps"])


def test_thresholds_come_from_the_configuration():
    scores = _scores(safe=6, age=78)
    assert prep2_prediction(scores)["prediction"] == "Excellent"
    stricter = prep2_prediction(scores, {"prep2_age": 75})
    assert stricter["prediction"] == "Good" and stricter["thresholds"]["prep2_age"] == 75
    assert "≥ 75" in stricter["steps"][-1]
    assert prep2_prediction(_scores(safe=2, mep="negative", nihss=8),
                            {"prep2_nihss": 10})["prediction"] == "Limited"


def test_summary_carries_prep2_beside_the_imaging_tier():
    clinical = _scores(safe=3, age=70, mep="negative", nihss=9)
    with_scores = prognosis_summary(LEFT_DAMAGE, -0.31, clinical=clinical)
    imaging_only = prognosis_summary(LEFT_DAMAGE, -0.31)
    # The imaging tier is the same; PREP2 is added to it, with its source and cut-offs.
    assert with_scores["category"] == imaging_only["category"] == \
        "umn_damage_plic_asymmetry_at_or_above_prep_cutoff"
    assert imaging_only["prep2"] is None
    assert with_scores["prep2"]["prediction"] == "Poor"
    assert "'Poor'" in with_scores["summary"] and imaging_only["summary"] in with_scores["summary"]
    assert any(r.startswith("PREP2: Step 3: NIHSS 9 ≥ 7") for r in with_scores["rationale"])
    assert any("acn3.488" in r for r in with_scores["references"])
    assert with_scores["thresholds"]["prep2_nihss"] == 7.0
    assert with_scores["thresholds"]["prep_plic_ai"] == 0.25


def test_prep2_needs_no_imaging():
    """A CST that could not be assessed still gets the bedside prediction."""
    result = prognosis_summary(NOT_ASSESSABLE, math.nan, qc_reasons=["Too few streamlines."],
                               clinical=_scores(safe=9))
    assert result["category"] == "not_assessable"
    assert result["prep2"]["prediction"] == "Excellent"
    missing = prognosis_summary(NO_DAMAGE, 0.01, clinical=_scores(age=64))
    assert missing["prep2"]["prediction"] is None
    assert "lacks safe_score" in missing["summary"]


def _participants(tmp_path, header, *rows):
    path = tmp_path / "participants.tsv"
    path.write_text("\n".join("\t".join(r) for r in (header, *rows)) + "\n")
    return tmp_path


def test_scores_are_read_from_participants_tsv(tmp_path):
    bids = _participants(
        tmp_path, ["participant_id", "age", "sex", "safe_score", "mep_status", "nihss"],
        ["sub-01", "72", "F", "4", "MEP-", "n/a"],
        ["sub-02", "n/a", "M", "", "positive", "3"])
    assert read_clinical_scores(bids, "01") == {"age": 72.0, "safe_score": 4.0,
                                                "nihss": None, "mep_status": "negative",
                                                "diagnosis": None}
    assert read_clinical_scores(bids, "02") == {"age": None, "safe_score": None, "nihss": 3.0,
                                                "mep_status": "positive", "diagnosis": None}
    nobody = dict.fromkeys(("age", "safe_score", "nihss", "mep_status", "diagnosis"))
    assert read_clinical_scores(bids, "03") == nobody          # not listed
    assert read_clinical_scores(tmp_path / "none", "01") == nobody  # no participants.tsv
    (tmp_path / "ages").mkdir()
    only_age = _participants(tmp_path / "ages", ["participant_id", "age"], ["sub-01", "55"])
    assert read_clinical_scores(only_age, "01") == {**nobody, "age": 55.0}


@pytest.mark.parametrize("column, value", [("safe_score", "12"), ("safe_score", "five"),
                                           ("nihss", "-1"), ("age", "nan"),
                                           ("mep_status", "maybe")])
def test_an_invalid_score_is_an_input_error(tmp_path, column, value):
    bids = _participants(tmp_path, ["participant_id", column], ["sub-01", value])
    with pytest.raises(InputError) as caught:
        read_clinical_scores(bids, "01")
    text = str(caught.value)
    assert f"sub-01: '{column}'" in text and repr(value) in text
    assert "participants.tsv" in text and "n/a" in text


@pytest.mark.parametrize("mep, expected", [("negative", "the PREP MRI step applies"),
                                           ("positive", "does not apply")])
def test_known_mep_status_says_whether_the_prep_mri_step_applies(mep, expected):
    result = prognosis_summary(LEFT_DAMAGE, -0.1, clinical=_scores(mep=mep))
    assert any(expected in r for r in result["rationale"])
    assert result["prep2"]["missing"] == ["safe_score"]


FA_BY_LEVEL = {"left": {"cerebral_peduncle": 0.62, "internal_capsule": 0.69},
               "right": {"cerebral_peduncle": 0.71, "internal_capsule": 0.74}}


@pytest.mark.parametrize("diagnosis", ["ALS", "sporadic amyotrophic lateral sclerosis",
                                       "PLS", "motor neurone disease"])
def test_motor_neuron_disease_gets_als_cutoffs_as_context_and_no_stroke_rules(diagnosis):
    clinical = {**_scores(safe=3, age=60, mep="negative", nihss=9), "diagnosis": diagnosis}
    result = prognosis_summary(LEFT_DAMAGE, -0.12, clinical=clinical, fa_by_level=FA_BY_LEVEL)
    assert result["prep2"] is None and result["category"] == "umn_damage"
    assert "PREP" not in result["summary"] and "context" in result["summary"]
    assert any("not applied to" in r for r in result["rationale"])
    context = result["context"]
    assert context["label"].startswith("context only")
    assert context["at_or_below"] == {"left": {"internal_capsule": True,
                                               "cerebral_peduncle": True},
                                      "right": {"internal_capsule": False,
                                                "cerebral_peduncle": False}}
    assert "Left CST FA at the cerebral peduncle: 0.620 (at or below the reported ALS cut-off "\
           "0.686)." in context["statements"]
    assert result["references"] == [context["source"]]


def test_stroke_or_no_diagnosis_keeps_the_stroke_rules():
    for diagnosis in ("ischaemic stroke", "falsely suspected", None):  # "als" inside a word
        clinical = {**_scores(safe=9), "diagnosis": diagnosis}
        result = prognosis_summary(NO_DAMAGE, 0.01, clinical=clinical, fa_by_level=FA_BY_LEVEL)
        assert result["context"] is None and result["prep2"]["prediction"] == "Excellent"
    missing = prognosis_summary(LEFT_DAMAGE, -0.1, clinical={"diagnosis": "ALS"})
    assert missing["context"]["values"]["left"]["internal_capsule"] is None
    assert "not measured" in missing["context"]["statements"][0]
