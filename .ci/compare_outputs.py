"""Check that two cst-integrity output folders hold the same results.

Usage: python .ci/compare_outputs.py REFERENCE_OUT OTHER_OUT

For every run in REFERENCE_OUT: the metrics JSON is equal apart from its creation
time, both CST tractograms hold the same streamlines bit for bit, and the
profiles TSV is the same byte for byte. Exit status 1 on the first difference.
"""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

#: Fields that legitimately differ between two runs of the same inputs.
RUN_SPECIFIC = (("provenance", "created"),)


def _metrics_without_run_specific_fields(path):
    metrics = json.loads(path.read_text())
    for section, key in RUN_SPECIFIC:
        metrics.get(section, {}).pop(key, None)
    return metrics


def _same_streamlines(a, b):
    first = nib.streamlines.load(str(a)).streamlines
    second = nib.streamlines.load(str(b)).streamlines
    return len(first) == len(second) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(first, second))


def compare(reference, other):
    """Differences between the runs of two output folders (empty list: identical)."""
    metrics_files = sorted(reference.glob("sub-*/**/*_desc-cst_metrics.json"))
    if not metrics_files:
        return [f"no metrics JSON in {reference}"]
    problems = []
    for metrics in metrics_files:
        found_before = len(problems)
        folder = metrics.parent.relative_to(reference)
        stem = metrics.name.removesuffix("_desc-cst_metrics.json")
        twin = other / folder / metrics.name
        if not twin.exists():
            problems.append(f"{stem}: missing in {other}")
            continue
        if _metrics_without_run_specific_fields(metrics) != \
                _metrics_without_run_specific_fields(twin):
            problems.append(f"{stem}: metrics JSON differs")
        profiles = f"{stem}_desc-profiles_tractometry.tsv"
        if (reference / folder / profiles).read_bytes() != (other / folder / profiles).read_bytes():
            problems.append(f"{stem}: profiles TSV differs")
        for hemi in ("L", "R"):
            trk = f"{stem}_hemi-{hemi}_desc-CST_tractography.trk"
            if not _same_streamlines(reference / folder / trk, other / folder / trk):
                problems.append(f"{stem}: hemi-{hemi} streamlines differ")
        if len(problems) == found_before:
            print(f"{stem}: same metrics, streamlines and profiles")
    return problems


if __name__ == "__main__":
    problems = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)
