"""A participant's clinical scores from the BIDS ``participants.tsv`` (for the prognosis).

PREP2 (Stinear et al. 2017) needs four bedside facts that no scan holds. They are
read from these optional columns of ``participants.tsv`` (``n/a`` or an empty
cell: not known):

``age``
    years at the stroke.
``safe_score``
    SAFE score of the paretic arm, 0-10: MRC grade (0-5) of shoulder abduction
    plus that of finger extension, on day 3 after the stroke.
``mep_status``
    upper-limb motor-evoked potential to TMS of the lesioned hemisphere:
    ``positive``/``negative`` (also ``MEP+``/``MEP-``, ``+``/``-``).
``nihss``
    NIH Stroke Scale score on day 3, 0-42.
``diagnosis``
    free text, e.g. ``stroke`` or ``ALS``. PREP and PREP2 were made for stroke: a
    motor neuron disease (ALS, PLS, MND) gets published CST FA cut-offs as context
    instead (:func:`pipeline.clinical.prognosis.motor_neuron_disease_context`).

A value that cannot be one of these is an input error (naming the file, the
participant and the column), not a silent "unknown": a typo in a SAFE score
would change the prediction.
"""

import csv
from pathlib import Path

from ..errors import InputError

#: Column -> (lowest, highest) for the numeric scores.
NUMERIC_COLUMNS = {"age": (0.0, 120.0), "safe_score": (0.0, 10.0), "nihss": (0.0, 42.0)}
MEP_VALUES = {"positive": "positive", "mep+": "positive", "+": "positive",
              "negative": "negative", "mep-": "negative", "-": "negative"}
CLINICAL_COLUMNS = (*NUMERIC_COLUMNS, "mep_status", "diagnosis")
MISSING = {"", "n/a"}


def participants_file(bids_dir):
    """Path of the dataset's ``participants.tsv``, or None when it has none."""
    path = Path(bids_dir) / "participants.tsv"
    return path if path.is_file() else None


def participant_rows(bids_dir):
    """Rows of ``participants.tsv`` by participant id (``sub-<label>``); empty without it."""
    path = participants_file(bids_dir)
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = {}
        for row in csv.DictReader(handle, delimiter="\t"):
            rows.setdefault((row.get("participant_id") or "").strip(), row)
        return rows


def read_clinical_scores(bids_dir, label):
    """The PREP2 inputs of ``sub-<label>``; each None when its column or value is missing.

    Returns
    -------
    dict
        ``age`` (years), ``safe_score`` (0-10), ``nihss`` (0-42) as floats,
        ``mep_status`` as "positive"/"negative", ``diagnosis`` as written; all None without a
        ``participants.tsv`` or without a row for the participant.

    Raises
    ------
    InputError
        When a present value is not a valid score.
    """
    scores = dict.fromkeys(CLINICAL_COLUMNS)
    row = participant_rows(bids_dir).get(f"sub-{label}")
    if row is None:
        return scores
    path = participants_file(bids_dir)
    for column, (lowest, highest) in NUMERIC_COLUMNS.items():
        text = (row.get(column) or "").strip()
        if text.lower() in MISSING:
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not lowest <= value <= highest:
            raise InputError(
                f"sub-{label}: '{column}' is {text!r}; it must be a number from {lowest:g} "
                f"to {highest:g}.", path=path,
                fix="Correct the value, or write n/a when it is not known.")
        scores[column] = value
    text = (row.get("mep_status") or "").strip()
    if text.lower() not in MISSING:
        if text.lower() not in MEP_VALUES:
            raise InputError(
                f"sub-{label}: 'mep_status' is {text!r}; it must be positive or negative.",
                path=path, fix="Write positive (an upper-limb MEP was elicited), negative, "
                               "or n/a when TMS was not done.")
        scores["mep_status"] = MEP_VALUES[text.lower()]
    text = (row.get("diagnosis") or "").strip()
    scores["diagnosis"] = None if text.lower() in MISSING else text
    return scores
