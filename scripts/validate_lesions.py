#!/usr/bin/env python3
"""Validation: lesions implanted into real healthy scans, at each CST level and side.

For every subject the unmodified scan is run first (``cst-report``, defaults): any
finding there is a false positive, and its CST profiles give the lesion sites. For
each level that the profile covers inside the detection window, and each side, a
sphere centred on that side's profile node at the middle of the level is given a
radial-diffusivity lesion (:mod:`pipeline.lesion_model`; "severe": FA -50 %,
"mild": FA -25 %), written into a copy of the dataset (inputs are never touched) and
run again. Printed: one row per lesion (side and level found, peak error in mm), the
rates, and the findings on the unmodified scans.

Usage (repository root, the README's venv)::

    .venv/bin/python scripts/validate_lesions.py --out /tmp/cst-validation \\
        --subjects philips01 philips02 toshiba01 --severity severe mild --n-jobs 2

A rerun with the same ``--out`` resumes every run from its work folder.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.dwi import load_dwi  # noqa: E402
from pipeline.errors import EXIT_NOT_ASSESSABLE, EXIT_OK  # noqa: E402
from pipeline.lesion_model import implant_lesion, profile_lesion_site  # noqa: E402
from pipeline.localization import DEFAULT_THRESHOLDS  # noqa: E402
from pipeline.normative import read_profiles  # noqa: E402

LEVELS = ("pons", "cerebral_peduncle", "internal_capsule", "corona_radiata")
SEVERITY_FA_DROP = {"severe": 0.5, "mild": 0.25}
RADIUS_MM = 6.0
#: A level needs this many profile nodes inside the detection window to host a lesion.
MIN_LEVEL_NODES = 4


def run_report(bids, label, out, n_jobs):
    """``cst-report`` on one subject; the metrics dict.

    A rerun resumes from the run's work folder, so after a change of the detection
    settings only the assessment and the report are redone.
    """
    metrics = out / f"sub-{label}" / "dwi" / f"sub-{label}_desc-cst_metrics.json"
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).with_name("cst-report")), label,
                           "--bids-dir", str(bids), "--out-dir", str(out),
                           "--n-jobs", str(n_jobs)], capture_output=True, text=True)
    if done.returncode not in (EXIT_OK, EXIT_NOT_ASSESSABLE) or not metrics.is_file():
        raise RuntimeError(f"cst-report failed on {bids} sub-{label}:\n{done.stderr}")
    print(f"    ran sub-{label} in {time.monotonic() - started:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def lesion_sites(profiles_tsv):
    """(side, level, node, centre RAS mm) for every level and side the profile allows."""
    profiles = read_profiles(profiles_tsv)
    sites = []
    for side in ("left", "right"):
        for level in LEVELS:
            site = profile_lesion_site(profiles[side]["level"], profiles[side]["xyz"], level,
                                       end_nodes=DEFAULT_THRESHOLDS["end_nodes"],
                                       min_nodes=MIN_LEVEL_NODES)
            if site is not None:
                sites.append((side, level, *site))
    return sites


def lesioned_dataset(source_bids, label, root, site, fa_drop):
    """A one-subject BIDS copy of ``sub-<label>`` with the lesion implanted; its truth."""
    side, level, node, centre = site
    bids = root / "bids"
    dwi_dir = bids / f"sub-{label}" / "dwi"
    truth_file = root / "truth.json"
    if truth_file.is_file():
        return bids, json.loads(truth_file.read_text())
    source = source_bids / f"sub-{label}" / "dwi"
    image = next(source.glob(f"sub-{label}_dwi.nii*"))
    dwi_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_bids / "dataset_description.json", bids / "dataset_description.json")
    for extra in source.glob(f"sub-{label}_dwi.*"):
        if extra != image:
            shutil.copyfile(extra, dwi_dir / extra.name)
    stem = str(image)[: -len(".nii.gz")] if image.name.endswith(".gz") else str(image)[:-4]
    scan = load_dwi(image, f"{stem}.bval", f"{stem}.bvec", check_data=False)
    data = np.asarray(scan.img.dataobj)
    lesioned, info = implant_lesion(data, scan.bvals, scan.bvecs_fsl, scan.affine, centre,
                                    radius_mm=RADIUS_MM, fa_drop=fa_drop)
    out_img = nib.Nifti1Image(lesioned, scan.img.affine, scan.img.header)
    nib.save(out_img, str(dwi_dir / "tmp.nii.gz"))
    (dwi_dir / "tmp.nii.gz").rename(dwi_dir / f"sub-{label}_dwi.nii.gz")
    truth = {"subject": label, "side": side, "level": level, "node": node,
             "centre_ras_mm": [round(float(v), 2) for v in centre], "radius_mm": RADIUS_MM,
             "fa_drop": fa_drop, **info}
    truth_file.write_text(json.dumps(truth, indent=1))
    return bids, truth


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=REPO.parent / "shared" / "data" / "bids")
    parser.add_argument("--subjects", nargs="+", default=["philips01", "philips02", "toshiba01"])
    parser.add_argument("--severity", nargs="+", choices=sorted(SEVERITY_FA_DROP),
                        default=["severe", "mild"])
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args(argv)

    rows, false_positives = [], []
    for label in args.subjects:
        print(f"sub-{label}: unmodified scan", flush=True)
        reference = args.out / label / "unmodified"
        metrics = run_report(args.bids_dir, label, reference, args.n_jobs)
        if metrics["localization"]["umn_damage"]:
            false_positives.append((label, metrics["localization"]))
        profiles_tsv = reference / f"sub-{label}" / "dwi" / \
            f"sub-{label}_desc-profiles_tractometry.tsv"
        for site in lesion_sites(profiles_tsv):
            if site[1] not in args.levels:
                continue
            for severity in args.severity:
                root = args.out / label / f"{site[0]}-{site[1]}-{severity}"
                bids, truth = lesioned_dataset(args.bids_dir, label, root, site,
                                               SEVERITY_FA_DROP[severity])
                print(f"  {site[0]} {site[1]} {severity}: FA {truth['fa_before']:.2f} -> "
                      f"{truth['fa_after']:.2f} in {truth['n_voxels']} voxels", flush=True)
                found = run_report(bids, label, root / "out", args.n_jobs)["localization"]
                error = (float(np.linalg.norm(np.subtract(found["peak_ras_mm"],
                                                          truth["centre_ras_mm"])))
                         if found["umn_damage"] else None)
                rows.append({**truth, "severity": severity, "detected": found["umn_damage"],
                             "found_side": found["affected_side"], "found_level": found["level"],
                             "peak_error_mm": error})

    print("\n| subject | side | level | severity | FA in sphere | detected | side | level "
          "found | peak error mm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        error = "-" if r["peak_error_mm"] is None else f"{r['peak_error_mm']:.1f}"
        print(f"| {r['subject']} | {r['side']} | {r['level']} | {r['severity']} | "
              f"{r['fa_before']:.2f} -> {r['fa_after']:.2f} | {'yes' if r['detected'] else 'no'}"
              f" | {r['found_side'] if r['detected'] else '-'} | "
              f"{r['found_level'] if r['detected'] else '-'} | {error} |")
    print()
    for severity in args.severity:
        mine = [r for r in rows if r["severity"] == severity]
        found = [r for r in mine if r["detected"]]
        if not mine:
            continue
        side_ok = sum(r["found_side"] == r["side"] for r in found)
        level_ok = sum(r["found_level"] == r["level"] for r in found)
        errors = [r["peak_error_mm"] for r in found]
        print(f"{severity}: {len(found)}/{len(mine)} detected; of those side correct "
              f"{side_ok}/{len(found)}, level correct {level_ok}/{len(found)}, peak error "
              + (f"median {np.median(errors):.1f} mm, max {max(errors):.1f} mm" if errors
                 else "n/a"))
    print(f"unmodified scans: {len(false_positives)} of {len(args.subjects)} with a finding"
          + "".join(f"; sub-{label}: {loc['affected_side']} {loc['level']}"
                    for label, loc in false_positives))
    (args.out / "validation.json").write_text(json.dumps(
        {"rows": rows, "false_positives": false_positives}, indent=1, default=str))


if __name__ == "__main__":
    main()
