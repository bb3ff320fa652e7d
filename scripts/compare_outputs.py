#!/usr/bin/env python
"""Compare two cst-report output folders file by file; exit status 1 on any difference.

Usage: python scripts/compare_outputs.py A_DIR B_DIR

Every file of either folder is compared with its namesake in the other, by what it holds:

- NIfTI (``.nii``, ``.nii.gz``): shape, data type, data array and affine;
- TrackVis ``.trk``: the streamlines' coordinates, in order;
- TRX ``.trx`` (a zip): the names and bytes of its members (not the zip's times);
- JSON: equal once the run's provenance is left out: creation times, durations, software
  versions (:data:`PROVENANCE_KEYS`) and the paths of the input files (``path``; their
  checksums stay); each folder's own path is written ``<OUT>`` in every string;
- HTML: equal once ISO 8601 times and each folder's own path are masked;
- TSV, CSV and anything else (``.bidsignore``): byte for byte.

The run logs (``sub-*/log/``) are listed and skipped: they hold times and paths only.
``--results-only`` compares only the results every run must reproduce whatever executed
it (the metrics JSON, the profiles TSV and the CST tractograms): CI compares a local run
with its SLURM runs so.
"""

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

#: JSON keys of the run's provenance: when it ran, how long, with which versions.
PROVENANCE_KEYS = {"created", "timestamp", "duration", "elapsed", "seconds", "wall_s",
                   "software", "SoftwareVersions", "Version"}
#: JSON keys holding the location of an input file (its checksum is kept).
PATH_KEYS = {"path"}
ISO_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?")


def _is_log(relative):
    return len(relative.parts) >= 2 and relative.parts[0].startswith("sub-") \
        and relative.parts[1] == "log"


def _kind(relative):
    name = relative.name
    if _is_log(relative):
        return "log"
    for suffix, kind in ((".nii.gz", "nifti"), (".nii", "nifti"), (".trk", "trk"),
                         (".trx", "trx"), (".json", "json"), (".html", "html"),
                         (".tsv", "tsv"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    return "bytes"


def _same_nifti(a, b):
    first, second = nib.load(str(a)), nib.load(str(b))
    if first.shape != second.shape or first.get_data_dtype() != second.get_data_dtype():
        return False
    return (np.array_equal(first.affine, second.affine)
            and np.array_equal(np.asanyarray(first.dataobj), np.asanyarray(second.dataobj),
                               equal_nan=True))


def _same_trk(a, b):
    first = nib.streamlines.load(str(a)).streamlines
    second = nib.streamlines.load(str(b)).streamlines
    return len(first) == len(second) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(first, second))


def _trx_members(path):
    with zipfile.ZipFile(io.BytesIO(Path(path).read_bytes())) as archive:
        return {member: archive.read(member) for member in archive.namelist()}


def _without_provenance(value, roots):
    if isinstance(value, dict):
        return {k: _without_provenance(v, roots) for k, v in value.items()
                if k not in PROVENANCE_KEYS and k not in PATH_KEYS}
    if isinstance(value, list):
        return [_without_provenance(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<OUT>")
    return value


def _masked_html(path, roots):
    text = ISO_TIME.sub(b"<TIME>", Path(path).read_bytes())
    for root in roots:
        text = text.replace(root.encode(), b"<OUT>")
    return text


def compare_file(a, b, kind, roots):
    """Whether the files ``a`` and ``b`` of kind ``kind`` hold the same results."""
    if kind == "nifti":
        return _same_nifti(a, b)
    if kind == "trk":
        return _same_trk(a, b)
    if kind == "trx":
        return _trx_members(a) == _trx_members(b)
    if kind == "json":
        return (_without_provenance(json.loads(Path(a).read_text()), roots)
                == _without_provenance(json.loads(Path(b).read_text()), roots))
    if kind == "html":
        return _masked_html(a, roots) == _masked_html(b, roots)
    return Path(a).read_bytes() == Path(b).read_bytes()


#: The files of ``--results-only``, by the end of their names.
RESULT_SUFFIXES = ("_desc-cst_metrics.json", "_desc-profiles_tractometry.tsv",
                   "_desc-CST_tractography.trk")


def compare(a_dir, b_dir, *, results_only=False):
    """Rows ``(relative path, kind, outcome)``, outcome one of "identical", "DIFFERENT",
    "ONLY IN A", "ONLY IN B", "skipped"; only the files of :data:`RESULT_SUFFIXES` with
    ``results_only``."""
    a_dir, b_dir = Path(a_dir).resolve(), Path(b_dir).resolve()
    # The work folder is not an output (a run removes it unless --keep-work).
    files = {p.relative_to(root) for root in (a_dir, b_dir) for p in root.rglob("*")
             if p.is_file() and ".cst-work" not in p.relative_to(root).parts
             and (not results_only or p.name.endswith(RESULT_SUFFIXES))}
    roots = sorted((str(a_dir), str(b_dir)), key=len, reverse=True)
    rows = []
    for relative in sorted(files):
        kind = _kind(relative)
        a, b = a_dir / relative, b_dir / relative
        if kind == "log":
            outcome = "skipped"
        elif not a.is_file():
            outcome = "ONLY IN B"
        elif not b.is_file():
            outcome = "ONLY IN A"
        else:
            outcome = "identical" if compare_file(a, b, kind, roots) else "DIFFERENT"
        rows.append((str(relative), kind, outcome))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a_dir", type=Path)
    parser.add_argument("b_dir", type=Path)
    parser.add_argument("--results-only", action="store_true",
                        help="only the metrics JSON, profiles TSV and CST tractograms")
    args = parser.parse_args(argv)
    for folder in (args.a_dir, args.b_dir):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    rows = compare(args.a_dir, args.b_dir, results_only=args.results_only)
    width = max((len(path) for path, _, _ in rows), default=4)
    print(f"{'file':<{width}}  {'compared as':<11}  result")
    for path, kind, outcome in rows:
        print(f"{path:<{width}}  {kind:<11}  {outcome}")
    compared = [row for row in rows if row[2] != "skipped"]
    different = [row for row in compared if row[2] != "identical"]
    print(f"\n{len(compared) - len(different)} of {len(compared)} files identical"
          f"{f', {len(different)} different' if different else ''}; "
          f"{len(rows) - len(compared)} run log files skipped")
    return 1 if different or not compared else 0


if __name__ == "__main__":
    sys.exit(main())
