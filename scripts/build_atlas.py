#!/usr/bin/env python
"""Rebuild the bundled MNI152 2 mm atlas files in ``atlases/`` deterministically.

Sources (see atlases/README.md for licences and citations):

* TractSeg 2.10 wheel (Apache-2.0): ``tractseg/resources/MNI_FA_template.nii.gz``
  (FSL MNI152 space, 1.25 mm, LAS storage).
* Debian package ``mricron-data`` (BSD-3-clause, Chris Rorden):
  ``usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz`` + ``.nii.txt``
  (ICBM-DTI-81 / JHU white-matter labels, Mori et al. 2008; Oishi et al.).

Every resampling goes through world (scanner, MNI mm) coordinates using the affines
of source and target, never voxel indices.  Output grid: 91 x 109 x 91, 2 mm
isotropic, RAS+ storage, origin (-90, -126, -72) mm (the FSL MNI152 2 mm box).

Usage::

    python scripts/build_atlas.py [--out-dir atlases] [--fa-template PATH]
        [--jhu-labels PATH] [--jhu-names PATH] [--tractseg-license PATH]
        [--mricron-copyright PATH] [--fetch]

Without paths it looks in /tmp/wheels and /tmp/mri, and with ``--fetch`` (or when
those are missing) it runs ``pip download --no-deps tractseg==2.10`` and
``apt-get download mricron-data`` into a temporary folder and unpacks them.
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- target grid
SHAPE = (91, 109, 91)
VOX = 2.0
ORIGIN = (-90.0, -126.0, -72.0)
TARGET_AFFINE = np.array(
    [[VOX, 0, 0, ORIGIN[0]], [0, VOX, 0, ORIGIN[1]], [0, 0, VOX, ORIGIN[2]], [0, 0, 0, 1.0]]
)

# FSL's own header of the JHU 1 mm atlas (LAS storage, 182 x 218 x 182).
FSL_JHU_1MM_AFFINE = np.array(
    [[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1.0]]
)

CST_LABELS = [
    (1, "motor_L", "L", "cortex"),
    (2, "motor_R", "R", "cortex"),
    (3, "plic_L", "L", "internal_capsule"),
    (4, "plic_R", "R", "internal_capsule"),
    (5, "peduncle_L", "L", "cerebral_peduncle"),
    (6, "peduncle_R", "R", "cerebral_peduncle"),
    (7, "pons_L", "L", "pons"),
    (8, "pons_R", "R", "pons"),
    (9, "medulla_L", "L", "medulla"),
    (10, "medulla_R", "R", "medulla"),
]
LEVELS = [
    (1, "medulla"),
    (2, "pons"),
    (3, "cerebral_peduncle"),
    (4, "internal_capsule"),
    (5, "corona_radiata"),
    (6, "cortex"),
]

# Motor target box (MNI mm).  M1/precentral + paracentral band, cf. Mayka et al. 2006
# (HMAT; NeuroImage 31:1453) -- M1 lies at roughly y -40..0 high on the hemisphere.
MOTOR_Y = (-40.0, 0.0)
MOTOR_ABS_X = (3.0, 55.0)
MIN_ROI_VOXELS = 80  # below this a ROI is dilated by one voxel (within the brain mask)
MAX_DILATIONS = 2  # ... at most this many times

DEFAULT_FA = "/tmp/wheels/ts/tractseg/resources/MNI_FA_template.nii.gz"
DEFAULT_TS_LICENSE = "/tmp/wheels/ts/tractseg-2.10.dist-info/licenses/LICENSE"
DEFAULT_JHU = "/tmp/mri/usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz"
DEFAULT_JHU_TXT = "/tmp/mri/usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.txt"
DEFAULT_COPYRIGHT = "/tmp/mri/usr/share/doc/mricron-data/copyright"


# ---------------------------------------------------------------- helpers
def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_nifti(data: np.ndarray, path: Path, dtype, intent: str | None = None) -> None:
    """Write a NIfTI with a fixed header and a gzip stream without timestamp."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), TARGET_AFFINE)
    img.set_qform(TARGET_AFFINE, code=4)  # MNI152
    img.set_sform(TARGET_AFFINE, code=4)
    img.header.set_xyzt_units("mm", "sec")
    if intent:
        img.header.set_intent(intent)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    path.write_bytes(buf.getvalue())


def target_world() -> np.ndarray:
    ijk = np.indices(SHAPE).reshape(3, -1).T.astype(float)
    return nib.affines.apply_affine(TARGET_AFFINE, ijk)


def resample_linear(data: np.ndarray, src_affine: np.ndarray) -> np.ndarray:
    vox = nib.affines.apply_affine(np.linalg.inv(src_affine), target_world()).T
    out = ndi.map_coordinates(np.asarray(data, float), vox, order=1, mode="constant", cval=0.0)
    return out.reshape(SHAPE)


def resample_nearest(data: np.ndarray, src_affine: np.ndarray) -> np.ndarray:
    vox = nib.affines.apply_affine(np.linalg.inv(src_affine), target_world())
    idx = np.rint(vox).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(data.shape)), axis=1)
    out = np.zeros(idx.shape[0], dtype=data.dtype)
    out[ok] = data[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out.reshape(SHAPE)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))


# ---------------------------------------------------------------- fetching
def fetch_sources(workdir: Path) -> dict:
    """Download and unpack the two upstream packages with their ordinary clients."""
    ts = workdir / "ts"
    mri = workdir / "mri"
    ts.mkdir(parents=True, exist_ok=True)
    mri.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "tractseg==2.10", "-d", str(workdir)],
        check=True,
    )
    wheel = sorted(glob.glob(str(workdir / "TractSeg-2.10*.whl")) + glob.glob(str(workdir / "tractseg-2.10*.whl")))
    if not wheel:
        raise SystemExit("tractseg 2.10 wheel not found after pip download")
    with zipfile.ZipFile(wheel[0]) as zf:
        zf.extractall(ts)
    subprocess.run(["apt-get", "download", "mricron-data"], check=True, cwd=workdir)
    deb = sorted(glob.glob(str(workdir / "mricron-data_*.deb")))
    if not deb:
        raise SystemExit("mricron-data .deb not found after apt-get download")
    subprocess.run(["dpkg", "-x", deb[0], str(mri)], check=True)
    lic = sorted(glob.glob(str(ts / "tractseg-2.10.dist-info" / "**" / "LICENSE*"), recursive=True))
    return {
        "fa_template": str(ts / "tractseg/resources/MNI_FA_template.nii.gz"),
        "tractseg_license": lic[0] if lic else "",
        "jhu_labels": str(mri / "usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz"),
        "jhu_names": str(mri / "usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.txt"),
        "mricron_copyright": str(mri / "usr/share/doc/mricron-data/copyright"),
        "deb": os.path.basename(deb[0]),
    }


# ---------------------------------------------------------------- JHU geometry
def jhu_world_affine(jhu: np.ndarray, jhu_affine: np.ndarray, fa_src: np.ndarray,
                     fa_affine: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, dict]:
    """Pick the JHU voxel->world mapping that agrees with the FA template.

    The mricron-data copy carries an RAS header (x = -91 + i) on what looks like
    FSL's LAS-ordered array: under that header every label *named* "_L" sits at
    world x > 0.  We compare the header with FSL's own JHU header (x = 90 - i) by the
    overlap of the JHU white-matter labels with the FA template (FA > 0.35) and keep
    the better one; left/right is then checked again by centroid.
    """
    ijk = np.argwhere(np.ones(jhu.shape, bool)).astype(float)
    wm = (jhu > 0).ravel()
    report = {}
    for name, aff in (("file_header", jhu_affine), ("fsl_header", FSL_JHU_1MM_AFFINE)):
        vox = nib.affines.apply_affine(np.linalg.inv(fa_affine), nib.affines.apply_affine(aff, ijk)).T
        fa = ndi.map_coordinates(fa_src.astype(float), vox, order=1, mode="constant", cval=0.0)
        hi = fa > 0.35
        dice = 2.0 * np.sum(wm & hi) / (wm.sum() + hi.sum())
        # how many "_L"-named labels land at world x < 0 under this header
        n_left_ok = n_left = 0
        for k, nm in names.items():
            if nm.endswith("_L") and np.any(jhu == k):
                n_left += 1
                n_left_ok += int(world_centroid(jhu == k, aff)[0] < 0)
        report[name] = {
            "affine": aff.tolist(),
            "dice_jhu_wm_vs_fa_gt_0.35": round(float(dice), 4),
            "mean_fa_in_jhu_wm": round(float(fa[wm].mean()), 4),
            "labels_named_L_with_world_x_lt_0": f"{n_left_ok}/{n_left}",
        }
    best = max(report, key=lambda k: report[k]["dice_jhu_wm_vs_fa_gt_0.35"])
    report["chosen"] = best
    return (jhu_affine if best == "file_header" else FSL_JHU_1MM_AFFINE), report


def read_names(path: Path) -> dict[int, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1].strip()
    return out


def labels_by_prefix(names: dict[int, str], prefix: str) -> list[int]:
    return sorted(k for k, v in names.items() if v.startswith(prefix))


# ---------------------------------------------------------------- main build
def build(args) -> None:
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "LICENSES").mkdir(exist_ok=True)

    src = {
        "fa_template": args.fa_template,
        "tractseg_license": args.tractseg_license,
        "jhu_labels": args.jhu_labels,
        "jhu_names": args.jhu_names,
        "mricron_copyright": args.mricron_copyright,
    }
    tmp = None
    if args.fetch or not all(Path(p).exists() for p in src.values()):
        tmp = tempfile.mkdtemp(prefix="cst_atlas_src_")
        print(f"fetching sources into {tmp}", file=sys.stderr)
        fetched = fetch_sources(Path(tmp))
        src.update({k: v for k, v in fetched.items() if k in src})
    for k, p in src.items():
        if not Path(p).exists():
            raise SystemExit(f"missing source {k}: {p}")

    # --- FA template and brain mask
    fa_img = nib.load(src["fa_template"])
    fa_src = np.asarray(fa_img.dataobj, dtype=np.float32)
    fa = resample_linear(fa_src, fa_img.affine).astype(np.float32)
    fa = np.clip(fa, 0.0, 1.0)

    mask = fa > 0.01
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    mask = ndi.binary_closing(mask, structure=ndi.generate_binary_structure(3, 1), iterations=1)
    mask = ndi.binary_fill_holes(mask)
    mask &= fa > 0  # never claim voxels the template leaves empty (closing only fills gaps)
    mask = ndi.binary_fill_holes(mask)

    # --- JHU labels (world-checked geometry)
    names = read_names(src["jhu_names"])
    jhu_img = nib.load(src["jhu_labels"])
    jhu = np.asarray(jhu_img.dataobj).astype(np.int16)
    jhu_aff, geometry_report = jhu_world_affine(jhu, jhu_img.affine, fa_src, fa_img.affine, names)

    def z_extent(keys):
        m = np.isin(jhu, keys)
        z = nib.affines.apply_affine(jhu_aff, np.argwhere(m))[:, 2]
        return float(z.min()), float(z.max())

    z_pons = z_extent(labels_by_prefix(names, "Middle_cerebellar_peduncle")
                      + labels_by_prefix(names, "Pontine_crossing_tract"))
    z_cp = z_extent(labels_by_prefix(names, "Cerebral_peduncle"))
    z_plic = z_extent(labels_by_prefix(names, "Posterior_limb_of_internal_capsule"))
    z_scr = z_extent(labels_by_prefix(names, "Superior_corona_radiata"))

    # band edges: half-way between the top of the lower structure and the bottom of
    # the upper one (1 mm source grid); bands are half-open [z_min, z_max).
    e_med_pons = z_pons[0] - 0.5
    e_pons_cp = 0.5 * (z_pons[1] + z_cp[0])
    e_cp_ic = 0.5 * (z_cp[1] + z_plic[0])
    e_ic_cr = 0.5 * (z_plic[1] + z_scr[0])
    e_cr_ctx = z_scr[1] + 0.5
    world = target_world().reshape(SHAPE + (3,))
    X, Y, Z = world[..., 0], world[..., 1], world[..., 2]
    zmin_grid = float(Z.min())
    zmax_grid = float(Z.max()) + VOX
    edges = [zmin_grid, e_med_pons, e_pons_cp, e_cp_ic, e_ic_cr, e_cr_ctx, zmax_grid]
    levels = np.zeros(SHAPE, np.int16)
    for (idx, _), lo, hi in zip(LEVELS, edges[:-1], edges[1:]):
        levels[mask & (Z >= lo) & (Z < hi)] = idx

    # --- CST ROIs
    jhu2 = resample_nearest(jhu, jhu_aff)
    rois = np.zeros(SHAPE, np.int16)
    log = {}

    def put(label_idx, roi_mask):
        rois[roi_mask & (rois == 0)] = label_idx

    def hemi_split(keys, region):
        """Map JHU label numbers to L/R by world centroid, never by name."""
        by_side = {}
        for k in keys:
            m = jhu2 == k
            if not m.any():
                continue
            cx = float(world_centroid(m, TARGET_AFFINE)[0])
            side = "L" if cx < 0 else "R"
            by_side.setdefault(side, []).append(k)
            log.setdefault("jhu_centroids", {})[names[k]] = {
                "world_x_mm": round(cx, 2), "assigned_hemi": side,
                "name_suffix_agrees": names[k].endswith("_" + side),
            }
        if set(by_side) != {"L", "R"}:
            raise SystemExit(f"{region}: could not find both hemispheres ({by_side})")
        return by_side

    idx_of = {name: i for i, name, _, _ in CST_LABELS}
    # motor: brain-mask voxels in the precentral/paracentral band, incl. juxtacortical WM
    motor = mask & (Y >= MOTOR_Y[0]) & (Y <= MOTOR_Y[1]) & (Z >= e_cr_ctx) \
        & (np.abs(X) >= MOTOR_ABS_X[0]) & (np.abs(X) <= MOTOR_ABS_X[1])
    put(idx_of["motor_L"], motor & (X < 0))
    put(idx_of["motor_R"], motor & (X > 0))
    for region, prefix, zrange in (
        ("plic", "Posterior_limb_of_internal_capsule", None),
        ("peduncle", "Cerebral_peduncle", None),
        ("pons", "Corticospinal_tract", (e_med_pons, e_pons_cp)),
        ("medulla", "Corticospinal_tract", (zmin_grid, e_med_pons)),
    ):
        sides = hemi_split(labels_by_prefix(names, prefix), region)
        for side, keys in sides.items():
            m = np.isin(jhu2, keys)
            if zrange is not None:
                m &= (Z >= zrange[0]) & (Z < zrange[1])
            put(idx_of[f"{region}_{side}"], m)

    # dilate thin ROIs by one voxel at a time inside the brain mask, same hemisphere, free
    # voxels, until they are sizeable (the JHU CST in the medulla band needs two steps:
    # ~25 voxels a side at 2 mm, since the JHU label stops at z = -55 mm)
    for i, name, hemi, _ in CST_LABELS:
        n0 = int((rois == i).sum())
        for _ in range(MAX_DILATIONS):
            if int((rois == i).sum()) >= MIN_ROI_VOXELS:
                break
            grown = ndi.binary_dilation(rois == i, ndi.generate_binary_structure(3, 1))
            grown &= mask & (rois == 0) & ((X < 0) if hemi == "L" else (X > 0))
            rois[grown] = i
        if n0 < MIN_ROI_VOXELS:
            log.setdefault("dilated", {})[name] = [n0, int((rois == i).sum())]

    # --- checks: non-empty, sizeable, left is world x < 0
    roi_stats = {}
    for i, name, hemi, level in CST_LABELS:
        m = rois == i
        n_vox = int(m.sum())
        if n_vox < MIN_ROI_VOXELS:
            raise SystemExit(f"ROI {name} too small: {n_vox} voxels")
        c = world_centroid(m, TARGET_AFFINE)
        if (hemi == "L") != (c[0] < 0):
            raise SystemExit(f"ROI {name} centroid x = {c[0]:.1f} mm is on the wrong side")
        roi_stats[name] = {"voxels": n_vox, "volume_mm3": n_vox * VOX ** 3,
                           "centroid_mni_mm": [round(float(v), 1) for v in c]}
    for i, name in LEVELS:
        if not (levels == i).any():
            raise SystemExit(f"level {name} empty")
    assert np.all((levels > 0) == mask)

    # --- write images
    files = {
        "fa": "tpl-MNI152_res-2_FA.nii.gz",
        "mask": "tpl-MNI152_res-2_desc-brain_mask.nii.gz",
        "cst": "tpl-MNI152_res-2_desc-CST_dseg.nii.gz",
        "cst_tsv": "tpl-MNI152_res-2_desc-CST_dseg.tsv",
        "levels": "tpl-MNI152_res-2_desc-levels_dseg.nii.gz",
        "levels_tsv": "tpl-MNI152_res-2_desc-levels_dseg.tsv",
    }
    save_nifti(fa, out / files["fa"], np.float32)
    save_nifti(mask, out / files["mask"], np.uint8)
    save_nifti(rois, out / files["cst"], np.int16, intent="label")
    save_nifti(levels, out / files["levels"], np.int16, intent="label")
    with open(out / files["cst_tsv"], "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name", "hemi", "level"])
        for row in CST_LABELS:
            w.writerow(row)
    level_rows = []
    with open(out / files["levels_tsv"], "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name", "z_min_mm", "z_max_mm"])
        for (i, name), lo, hi in zip(LEVELS, edges[:-1], edges[1:]):
            w.writerow([i, name, f"{lo:g}", f"{hi:g}"])
            level_rows.append({"index": i, "name": name, "z_min_mm": lo, "z_max_mm": hi})

    # --- licences
    shutil.copyfile(src["tractseg_license"], out / "LICENSES" / "Apache-2.0_TractSeg.txt")
    shutil.copyfile(src["mricron_copyright"], out / "LICENSES" / "BSD-3-Clause_mricron-data_debian-copyright.txt")

    # --- provenance
    tractseg = {"package": "TractSeg 2.10 (PyPI wheel)", "member": "tractseg/resources/MNI_FA_template.nii.gz",
                "sha256": sha256(src["fa_template"]), "license": "Apache-2.0",
                "license_file": "LICENSES/Apache-2.0_TractSeg.txt"}
    jhu_src = {"package": "Debian mricron-data 1.2.20211006+dfsg-4",
               "member": "usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz",
               "sha256": sha256(src["jhu_labels"]), "license": "BSD-3-clause (Debian copyright file)",
               "license_file": "LICENSES/BSD-3-Clause_mricron-data_debian-copyright.txt",
               "citation": "Mori S et al. 2008 NeuroImage 40:570-582 (ICBM-DTI-81); Oishi K et al."}
    jhu_txt = dict(jhu_src, member="usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.txt",
                   sha256=sha256(src["jhu_names"]))
    script_rel = "scripts/build_atlas.py"
    builder = {"script": script_rel, "script_sha256": sha256(Path(__file__).resolve()),
               "command": "python " + " ".join([script_rel] + [a for a in sys.argv[1:]]),
               "python": sys.version.split()[0], "numpy": np.__version__, "nibabel": nib.__version__,
               "grid": {"shape": list(SHAPE), "voxel_mm": VOX, "affine": TARGET_AFFINE.tolist(),
                        "orientation": "RAS+", "space": "FSL MNI152 (ICBM152 nonlinear 6th gen)"}}
    prov = {
        "builder": builder,
        "jhu_geometry_check": geometry_report,
        "level_band_edges_from": {
            "pons (MCP + pontine crossing tract) z": z_pons, "cerebral_peduncle z": z_cp,
            "posterior_limb_internal_capsule z": z_plic, "superior_corona_radiata z": z_scr,
        },
        "levels": level_rows,
        "cst_rois": roi_stats,
        "notes": log,
        "files": {
            files["fa"]: {"sources": [tractseg], "method": "trilinear resampling via world coordinates, clipped to [0,1]"},
            files["mask"]: {"sources": [tractseg], "method": "FA > 0.01, largest component, closing, hole filling"},
            files["cst"]: {"sources": [tractseg, jhu_src, jhu_txt],
                           "method": "JHU labels resampled nearest-neighbour via world coordinates; "
                                     "hemisphere by world centroid; motor = brain-mask box (Mayka et al. 2006)"},
            files["cst_tsv"]: {"sources": [jhu_txt], "method": "label table written by the builder"},
            files["levels"]: {"sources": [tractseg, jhu_src, jhu_txt], "method": "z bands from JHU label z-extents within the brain mask"},
            files["levels_tsv"]: {"sources": [jhu_src, jhu_txt], "method": "band edges"},
            "LICENSES/Apache-2.0_TractSeg.txt": {"sources": [{"package": "TractSeg 2.10", "member": "tractseg-2.10.dist-info/licenses/LICENSE"}]},
            "LICENSES/BSD-3-Clause_mricron-data_debian-copyright.txt": {"sources": [{"package": "Debian mricron-data", "member": "usr/share/doc/mricron-data/copyright"}]},
        },
    }
    for fname, entry in prov["files"].items():
        entry["sha256"] = sha256(out / fname)
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=False) + "\n")

    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"rois": roi_stats, "levels": level_rows, "jhu_geometry": geometry_report["chosen"]}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "atlases"))
    p.add_argument("--fa-template", default=DEFAULT_FA)
    p.add_argument("--tractseg-license", default=DEFAULT_TS_LICENSE)
    p.add_argument("--jhu-labels", default=DEFAULT_JHU)
    p.add_argument("--jhu-names", default=DEFAULT_JHU_TXT)
    p.add_argument("--mricron-copyright", default=DEFAULT_COPYRIGHT)
    p.add_argument("--fetch", action="store_true", help="download the upstream packages even if paths exist")
    build(p.parse_args(argv))


if __name__ == "__main__":
    main()
