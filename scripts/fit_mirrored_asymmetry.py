#!/usr/bin/env python
"""Learn the healthy mirrored-FA-asymmetry model from healthy validation runs.

Reads the runs ``scripts/validate_lesions.py`` keeps (``runs/<run>/healthy/<condition>/``,
with their work folders) of the subjects of one half of its split, every
condition, and writes ``atlases/tpl-MNI152_res-2_desc-mirroredAI_model.nii.gz``
plus its JSON sidecar (:mod:`pipeline.tractometry.mirrored`):

- the CST volume: template voxels that the tracked CSTs of the half's original
  (undegraded) runs pass through in at least half of the runs, mapped to the
  template by each run's affine registration, made symmetric, left half kept;
- the healthy mean and SD of the mirrored AI at each of its voxels;
- the white matter outside it (template FA > 0.25) that calibrates each scan;
- the Gumbel law of the statistic on held-out volunteers (leave-one-volunteer-out);
- the limit on the spread of z over the CST volume beyond which the test does not apply.

Usage::

    python scripts/fit_mirrored_asymmetry.py --validation /tmp/cstv --split tune
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.streamlines import load as load_streamlines
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from fit_healthy_asymmetry import volunteers  # noqa: E402
from validate_lesions import DEFAULT_BIDS, split_of  # noqa: E402

import atlases  # noqa: E402
from pipeline.tractometry import mirrored  # noqa: E402

#: A template voxel belongs to the CST volume when this fraction of the runs' CSTs reach it.
VOLUME_FRACTION = 0.5
#: Template FA above which a voxel outside the CST volume calibrates the scan.
WHITE_MATTER_FA = 0.25
WORK = "out/.cst-work/*/*/cst_wf"


def healthy_runs(validation, half):
    """(run, condition, cst_wf work folder) of every healthy run with a registration."""
    for warped in sorted(Path(validation).glob(
            f"runs/*/healthy/*/{WORK}/register_atlas/fa_in_template.nii.gz")):
        work = warped.parents[1]
        condition_dir = warped.parents[6]
        run = condition_dir.parents[1].name
        if half == "all" or split_of(run.split("_")[0].removeprefix("sub-")) == half:
            yield run, condition_dir.name, work


def tract_density(works, template):
    """Fraction of ``works`` whose CSTs (either side) pass through each template voxel,
    through each run's affine registration (template world → subject world)."""
    world_to_template = np.linalg.inv(template.affine)
    density = np.zeros(template.shape)
    for work in works:
        qc = json.loads((work / "register_atlas" / "registration_qc.json").read_text())
        to_template = world_to_template @ np.linalg.inv(qc["affine_template_to_subject"])
        hit = np.zeros(template.shape, dtype=bool)
        for side in "LR":
            points = np.concatenate(list(load_streamlines(
                str(work / "track_cst" / f"cst_{side}.trk")).streamlines))
            ijk = np.rint(nib.affines.apply_affine(to_template, points)).astype(int)
            ijk = ijk[np.all((ijk >= 0) & (ijk < template.shape), axis=1)]
            hit[tuple(ijk.T)] = True
        density += hit
    return density / len(works)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validation", type=Path, required=True,
                        help="the --out folder of scripts/validate_lesions.py")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune")
    parser.add_argument("--out", type=Path, default=mirrored.MODEL_FILE)
    parser.add_argument("--bids", type=Path, action="append",
                        help="datasets whose participants.tsv name the volunteers "
                             "(default: the shared ones)")
    args = parser.parse_args(argv)
    runs = list(healthy_runs(args.validation, args.split))
    if not runs:
        raise SystemExit(f"no healthy run of the {args.split} half under {args.validation}")
    template = nib.load(atlases.template_fa_path())
    mirrored.check_midline(template.affine, template.shape)
    template_fa = np.asarray(template.dataobj, dtype=float)
    brain = np.asarray(nib.load(atlases.brain_mask_path()).dataobj) > 0
    left_half = np.zeros(template.shape, dtype=bool)
    left_half[: template.shape[0] // 2] = True  # voxel centres at x < 0

    density = tract_density([work for _, condition, work in runs if condition == "original"],
                            template)
    volume = density >= VOLUME_FRACTION
    volume = (volume | mirrored.mirror_x(volume)) & brain & left_half
    white_matter = ((template_fa > WHITE_MATTER_FA) & brain & left_half
                    & ~ndimage.binary_dilation(volume, iterations=2))

    ai_maps = np.array([mirrored.mirrored_ai(np.asarray(nib.load(
        work / "register_atlas" / "fa_in_template.nii.gz").dataobj)) for *_, work in runs])
    scales = np.array([mirrored.scan_scale(ai, white_matter) for ai in ai_maps])
    volunteer_of = volunteers(args.bids or DEFAULT_BIDS)
    run_volunteers = [volunteer_of.get(run.split("_")[0].removeprefix("sub-"), run)
                      for run, *_ in runs]
    model = mirrored.fit_model(ai_maps, scales, volume, white_matter, run_volunteers,
                               template.affine)
    maxima, spreads = model["held_out_maxima"], model["healthy_z_spread"]

    data = np.stack([model[name] for name in mirrored.MODEL_VOLUMES],
                    axis=-1).astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, template.affine), args.out)
    sidecar = {
        "volumes": list(mirrored.MODEL_VOLUMES),
        "reference_scale": round(model["reference_scale"], 5),
        "gumbel_loc": round(model["gumbel_loc"], 4),
        "gumbel_scale": round(model["gumbel_scale"], 4),
        "box_voxels": mirrored.BOX_VOXELS,
        "z_spread_limit": round(model["z_spread_limit"], 3),
        "healthy_z_spread": {"median": round(float(np.median(spreads)), 3),
                             "max": round(float(max(spreads)), 3)},
        "held_out_maxima": {"median": round(float(np.median(maxima)), 3),
                            "max": round(float(np.max(maxima)), 3), "n": len(maxima)},
        "cst_volume_voxels": int(volume.sum()),
        "white_matter_voxels": int(white_matter.sum()),
        "source": (f"scripts/fit_mirrored_asymmetry.py, {datetime.date.today()}: "
                   f"{len(runs)} healthy runs of the '{args.split}' half "
                   f"({len(set(run for run, *_ in runs))} scans of "
                   f"{len(set(run_volunteers))} volunteers; "
                   f"{', '.join(sorted({c for _, c, _ in runs}))}); "
                   "Gumbel law of the statistic leave-one-volunteer-out"),
        "runs": sorted(f"{run}/{condition}" for run, condition, _ in runs),
        "licence": "derived from the BSD-licensed shared scans (see their SOURCE.txt)",
    }
    Path(str(args.out).replace(".nii.gz", ".json")).write_text(
        json.dumps(sidecar, indent=1) + "\n")
    print(json.dumps({k: v for k, v in sidecar.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
