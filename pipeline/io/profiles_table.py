"""The profiles table: the TSV of a run's 100-node CST profiles (our columns and pyAFQ's)
and its CSV in pyAFQ's tract-profile layout, the one AFQ-Insight reads."""

import csv
import math
from pathlib import Path

import numpy as np

from ..cst import SIDES, TRACT_NAMES
from ..tractometry.profiles import PROFILE_METRICS
from .outputs import atomic_path

#: Columns of the profiles CSV: pyAFQ's tract-profile layout, the one AFQ-Insight reads.
AFQ_COLUMNS = ("subjectID", "sessionID", "tractID", "nodeID",
               *(f"dti_{m}" for m in PROFILE_METRICS))


def write_profiles_tsv(path, rows):
    """Write the profile rows (dicts with the same keys, in column order) as a TSV."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_profile_tables(source_tsv, tsv_path, stem):
    """A run's profiles TSV with the run's identity added, and the same profiles as CSV in
    pyAFQ's layout (:data:`AFQ_COLUMNS`) beside it.

    Both get ``sessionID``: pyAFQ and AFQ-Insight tell repeated acquisitions of one
    subject apart by it alone (AFQ-Insight takes every other column for a metric, so a
    text column such as ``run`` would stop it, and rows that differ only there would
    be averaged), so it holds the run's entities after the subject (``dir-AP``,
    ``ses-01_dir-AP``), or ``unknown``, pyAFQ's value, when there are none. The TSV
    also gets ``run``, the run's name as in the group table (``sub-01_dir-AP``).

    Parameters
    ----------
    source_tsv : path-like
        The profiles TSV of :func:`pipeline.steps.tract_profiles`.
    tsv_path : path-like
        The TSV to write; the CSV gets its name with ``.csv``.
    stem : str
        The run's name, ``sub-<label>[_<entities>]``.

    Returns
    -------
    list of str
        The TSV and the CSV.
    """
    session = stem.partition("_")[2] or "unknown"
    with open(source_tsv, newline="") as handle:
        rows = [{**row, "sessionID": session, "run": stem}
                for row in csv.DictReader(handle, delimiter="\t")]
    tsv_path = Path(tsv_path)
    csv_path = tsv_path.with_suffix(".csv")
    with atomic_path(tsv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=AFQ_COLUMNS)
        writer.writeheader()
        # An empty field, as pyAFQ writes a missing value (pandas' NaN).
        writer.writerows({c: "" if row[c] == "n/a" else row[c] for c in AFQ_COLUMNS}
                         for row in rows)
    return [str(tsv_path), str(csv_path)]


def _tsv_float(value):
    """A TSV cell as a float: NaN for 'n/a', an empty cell or anything not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_profiles_tsv(path) -> dict:
    """Read the profiles TSV (``tract, node, fa, md, rd, ad, x, y, z, level``).

    Returns
    -------
    dict side → dict with ``node`` (int array), ``fa, md, rd, ad, x, y, z`` (float
    arrays, NaN where 'n/a') and ``level`` (list of str or None), sorted by node.
    Sides absent from the file are absent from the dict.
    """
    by_tract = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            by_tract.setdefault((row.get("tract") or "").strip(), []).append(row)
    profiles = {}
    for side in SIDES:
        rows = by_tract.get(TRACT_NAMES[side])
        if not rows:
            continue
        rows.sort(key=lambda r: int(_tsv_float(r.get("node"))
                                    if math.isfinite(_tsv_float(r.get("node"))) else 0))
        prof = {"node": np.array([int(_tsv_float(r.get("node")))
                                  if math.isfinite(_tsv_float(r.get("node"))) else i
                                  for i, r in enumerate(rows)])}
        for column in ("fa", "md", "rd", "ad", "x", "y", "z"):
            prof[column] = np.array([_tsv_float(r.get(column)) for r in rows], dtype=float)
        levels = []
        for r in rows:
            level = (r.get("level") or "").strip()
            levels.append(None if level in ("", "n/a", "None", "nan") else level)
        prof["level"] = levels
        profiles[side] = prof
    return profiles
