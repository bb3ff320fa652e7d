"""Brain-like synthetic DWI phantom with a known left and right CST (and optional lesion).

The phantom lives on the bundled MNI152 2 mm atlas grid (``atlases``):

* tissue (atlas brain mask): FA magnitude taken from the FA template, MD 0.75e-3 mm²/s,
  principal direction drawn at random in every voxel -- so no coherent path exists outside
  the two CST tubes.  A uniform direction field (all left-right, say) would be coherent
  itself: a swapped gradient table then only turns it, fibre-coherence checks cannot tell
  the tables apart, and every slice's mean signal swings with the gradient direction as no
  real brain's does;
* around each CST tube (4 < d <= 10 mm from the curve) FA is capped at 0.15;
* CST_L / CST_R: tubes of radius 4 mm around a cubic spline (world mm) through the
  centroids of the atlas ROIs pons -> peduncle -> PLIC -> motor (extended a little below
  the pons and above the motor centroid); FA 0.7, principal direction = curve tangent;
* CSF-like isotropic diffusion (3e-3 mm²/s, brighter S0) outside the brain mask but
  inside a head ellipsoid; zero signal (and no noise) outside the ellipsoid;
* optional lesion: sphere of ``radius_mm`` centred on the curve of one side, at the
  middle of an atlas level band; the radial diffusivity is raised (axial kept) so that
  FA drops by the relative amount ``fa_drop``; the principal direction is unchanged.

Signals are computed with world-frame tensors and world-frame gradient directions,
S = S0 exp(-b gᵀDg), then stored as a dcm2niix-like LAS image (x flipped, negative
determinant) with the origin shifted by a few mm.  bvecs follow FSL/BIDS: the gradient
direction in the voxel-axis frame, with x flipped when the affine determinant is positive
(never the case here, but the conversion is written generally).

World coordinates of the stored image ("scanner RAS") = MNI coordinates + ``ORIGIN_SHIFT_MM``.
The ground truth records both.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

import atlases

from ..io.dwi import (
    fsl_bvecs_to_voxel_frame,
    voxel_directions_to_world,
    voxel_frame_to_fsl_bvecs,
    world_directions_to_voxel,
)

MD_TISSUE = 0.75e-3
MD_CSF = 3.0e-3
FA_TUBE = 0.7
FA_SHELL_MAX = 0.15
TUBE_RADIUS_MM = 4.0
SHELL_RADIUS_MM = 10.0
S0_TISSUE = 1000.0
S0_CSF = 1800.0
B_VALUE = 1000.0
ORIGIN_SHIFT_MM = np.array([2.0, -3.0, 4.0])
ROI_CHAIN = ("pons", "peduncle", "plic", "motor")
SIDES = {"L": "left", "R": "right"}


# ---------------------------------------------------------------- small helpers
def fa_to_ratio(fa):
    """lambda_par / lambda_perp of an axially symmetric tensor with the given FA."""
    fa = np.clip(np.asarray(fa, float), 0.0, 0.95)
    f2 = fa * fa
    return (1.0 + np.sqrt(1.0 - (1.0 - f2) * (1.0 - 2.0 * f2))) / (1.0 - f2)


def eigs_from_fa_md(fa, md):
    r = fa_to_ratio(fa)
    lperp = 3.0 * md / (r + 2.0)
    return r * lperp, lperp


def fa_of(lpar, lperp):
    lpar = np.asarray(lpar, float)
    lperp = np.asarray(lperp, float)
    num = np.abs(lpar - lperp)
    den = np.sqrt(lpar ** 2 + 2.0 * lperp ** 2)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)


def world_to_fsl_bvecs(g_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS) unit gradient directions (N,3) -> FSL/BIDS bvecs (3,N) for ``affine``."""
    return voxel_frame_to_fsl_bvecs(world_directions_to_voxel(g_world, affine), affine).T


def fsl_bvecs_to_world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`world_to_fsl_bvecs`: (3,N) FSL bvecs -> (N,3) world directions."""
    return voxel_directions_to_world(fsl_bvecs_to_voxel_frame(np.asarray(bvecs).T, affine), affine)


def gradient_directions(n: int, seed: int) -> np.ndarray:
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    hemi, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 2000, const=0.2)
    v = np.asarray(hemi.vertices, float)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write_gz_nifti(img: nib.Nifti1Image, path: Path) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as gz:
        gz.write(img.to_bytes())
    path.write_bytes(buf.getvalue())


def _roi_centroids(rois: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, idx in atlases.CST_ROI_LABELS.items():
        ijk = np.argwhere(rois == idx)
        out[name] = nib.affines.apply_affine(affine, ijk.mean(0))
    return out


def _curve(points: np.ndarray, step_mm: float = 0.5):
    """Cubic spline through points (chord-length parameter); dense samples + unit tangents."""
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    cs = CubicSpline(t, points, bc_type="natural")
    s = np.arange(0.0, t[-1] + 1e-9, step_mm)
    pts = cs(s)
    tan = cs(s, 1)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    return pts, tan


# ---------------------------------------------------------------- main API
def make_phantom_dataset(bids_dir, subject: str = "subject01",
                         lesion: dict | None = None, seed: int = 0,
                         n_directions: int = 30, snr: float = 30.0,
                         bvalues: tuple = (B_VALUE,)) -> dict:
    """Write a BIDS dataset with one synthetic DWI and return the ground truth.

    ``bvalues``: the shells (s/mm²), each with the same ``n_directions`` directions
    (several: a multi-shell scan; the signal stays the tensor's, mono-exponential).

    ``lesion``: ``{"side": "left"|"right", "level": <atlas level name>,
    "radius_mm": 6.0, "fa_drop": 0.5}`` or None.  Levels are those of
    ``atlases.LEVEL_LABELS`` (medulla, pons, cerebral_peduncle, internal_capsule,
    corona_radiata, cortex).
    """
    bids_dir = Path(bids_dir)
    label = subject[4:] if subject.startswith("sub-") else subject
    rng = np.random.default_rng(seed)

    # --- atlas grid (RAS, MNI mm)
    fa_img = nib.load(atlases.template_fa_path())
    aff_mni = fa_img.affine.copy()
    shape = fa_img.shape
    fa_tpl = np.asarray(fa_img.dataobj, np.float32)
    brain = np.asarray(nib.load(atlases.brain_mask_path()).dataobj) > 0
    rois = np.asarray(nib.load(atlases.cst_rois_path()).dataobj)
    cents = _roi_centroids(rois, aff_mni)
    ijk = np.indices(shape).reshape(3, -1).T
    world = nib.affines.apply_affine(aff_mni, ijk).reshape(shape + (3,))

    # --- curves
    curves = {}
    ctrl_points = {}
    for side in ("L", "R"):
        p = np.array([cents[f"{r}_{side}"] for r in ROI_CHAIN])
        below = p[0] + np.array([0.0, -3.0, -16.0])  # continue into the upper medulla
        above = p[-1] + 0.2 * (p[-1] - p[-2])        # a little beyond the motor centroid
        pts = np.vstack([below, p, above])
        ctrl_points[side] = pts
        curves[side] = _curve(pts)

    # --- distance to each curve for brain voxels
    bidx = np.argwhere(brain)
    bworld = world[brain]
    dist = np.full((2, len(bidx)), np.inf)
    near = np.zeros((2, len(bidx)), int)
    for k, side in enumerate(("L", "R")):
        tree = cKDTree(curves[side][0])
        dist[k], near[k] = tree.query(bworld, distance_upper_bound=SHELL_RADIUS_MM + 2.0)
    which = np.argmin(dist, axis=0)
    dmin = dist[which, np.arange(len(bidx))]

    # --- tensor field (axially symmetric: lambda_par along e, lambda_perp across)
    e = np.zeros(shape + (3,))
    fa = np.zeros(shape)
    fa[brain] = np.clip(fa_tpl[brain], 0.0, 0.9)
    b_fa = fa[brain]
    shell = dmin <= SHELL_RADIUS_MM
    b_fa[shell] = np.minimum(b_fa[shell], FA_SHELL_MAX)
    tube_lab = np.zeros(shape, np.uint8)
    b_tube = np.zeros(len(bidx), np.uint8)
    # Own stream, so that the noise below stays that of the seed.
    b_e = np.random.default_rng([seed, 1]).normal(size=(len(bidx), 3))
    b_e /= np.linalg.norm(b_e, axis=1, keepdims=True)
    for k, side in enumerate(("L", "R")):
        sel = (which == k) & (dmin <= TUBE_RADIUS_MM)
        b_fa[sel] = FA_TUBE
        b_e[sel] = curves[side][1][near[k][sel]]
        b_tube[sel] = k + 1
    fa[brain] = b_fa
    e[brain] = b_e
    tube_lab[brain] = b_tube
    lpar = np.zeros(shape)
    lperp = np.zeros(shape)
    lpar[brain], lperp[brain] = eigs_from_fa_md(b_fa, MD_TISSUE)

    # head ellipsoid around the brain (CSF-like), zero outside
    bb_lo = bworld.min(0)
    bb_hi = bworld.max(0)
    centre = 0.5 * (bb_lo + bb_hi)
    semi = 0.5 * (bb_hi - bb_lo) + 8.0
    head = (((world - centre) / semi) ** 2).sum(-1) <= 1.0
    head |= brain
    csf = head & ~brain
    lpar[csf] = lperp[csf] = MD_CSF
    s0 = np.zeros(shape)
    s0[brain] = S0_TISSUE
    s0[csf] = S0_CSF

    # --- lesion
    truth_lesion = None
    lesion_mask = np.zeros(shape, bool)
    if lesion:
        side_in = str(lesion.get("side", "left")).lower()
        side = {"left": "L", "l": "L", "right": "R", "r": "R"}[side_in]
        level = lesion.get("level", "internal_capsule")
        if level not in atlases.LEVEL_Z_RANGES:
            raise ValueError(f"unknown level {level!r}; choose from {list(atlases.LEVEL_Z_RANGES)}")
        radius = float(lesion.get("radius_mm", 6.0))
        drop = float(lesion.get("fa_drop", 0.5))
        if not 0.0 < drop < 1.0:
            raise ValueError("fa_drop must be in (0, 1)")
        z0, z1 = atlases.LEVEL_Z_RANGES[level]
        cpts = curves[side][0]
        zlo, zhi = max(z0, cpts[:, 2].min()), min(z1, cpts[:, 2].max())
        if zlo > zhi:
            raise ValueError(f"the {side} CST curve does not reach level {level}")
        zmid = 0.5 * (zlo + zhi)
        centre_mni = cpts[np.argmin(np.abs(cpts[:, 2] - zmid))]
        lesion_mask = brain & (np.linalg.norm(world - centre_mni, axis=-1) <= radius)
        tube_in = lesion_mask & (tube_lab == (1 if side == "L" else 2))
        fa_before = float(fa_of(lpar[tube_in], lperp[tube_in]).mean())
        target = fa[lesion_mask] * (1.0 - drop)
        lperp[lesion_mask] = lpar[lesion_mask] / fa_to_ratio(target)  # keep axial diffusivity
        fa[lesion_mask] = fa_of(lpar[lesion_mask], lperp[lesion_mask])
        fa_after = float(fa[tube_in].mean())
        truth_lesion = {
            "side": SIDES[side], "hemi": side, "level": level, "radius_mm": radius,
            "fa_drop": drop,
            "centre_ras_mm": (centre_mni + ORIGIN_SHIFT_MM).round(2).tolist(),
            "centre_mni_mm": centre_mni.round(2).tolist(),
            "fa_before": round(fa_before, 4), "fa_after": round(fa_after, 4),
            "n_voxels": int(lesion_mask.sum()), "n_tube_voxels": int(tube_in.sum()),
            "axial_diffusivity_kept": True,
        }

    # --- gradient table (world frame) and signal
    dirs = gradient_directions(n_directions, seed)
    n3 = len(dirs) // 3
    chunks = [dirs[:n3], dirs[n3:2 * n3], dirs[2 * n3:]]
    g_world = []
    bvals = []
    for c in chunks:
        g_world.append(np.zeros((1, 3)))
        bvals.append([0.0])
        for bvalue in bvalues:
            g_world.append(c)
            bvals.append([float(bvalue)] * len(c))
    g_world = np.vstack(g_world)
    bvals = np.concatenate(bvals)

    sigma = S0_TISSUE / float(snr)
    vox = np.argwhere(head)
    ev = e[head]
    lp, lq, s0v = lpar[head], lperp[head], s0[head]
    proj = ev @ g_world.T  # (V, N)  g.e
    adc = lq[:, None] + (lp - lq)[:, None] * proj ** 2
    sig = s0v[:, None] * np.exp(-bvals[None, :] * adc)
    n1 = rng.normal(0.0, sigma, sig.shape)
    n2 = rng.normal(0.0, sigma, sig.shape)
    sig = np.sqrt((sig + n1) ** 2 + n2 ** 2)
    data = np.zeros(shape + (len(bvals),), np.int16)
    data[vox[:, 0], vox[:, 1], vox[:, 2]] = np.clip(np.rint(sig), 0, 32767).astype(np.int16)

    # --- store LAS (x flipped), origin shifted (scanner RAS = MNI + shift)
    nx = shape[0]
    flip = np.array([[-1, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    shift = np.eye(4)
    shift[:3, 3] = ORIGIN_SHIFT_MM
    aff_store = shift @ aff_mni @ flip
    assert np.linalg.det(aff_store[:3, :3]) < 0
    data_store = data[::-1]
    bvecs = world_to_fsl_bvecs(g_world, aff_store)
    bvecs[:, bvals == 0] = 0.0

    dwi_dir = bids_dir / f"sub-{label}" / "dwi"
    dwi_dir.mkdir(parents=True, exist_ok=True)
    stem = dwi_dir / f"sub-{label}_dwi"
    img = nib.Nifti1Image(data_store, aff_store)
    img.set_qform(aff_store, code=1)
    img.set_sform(aff_store, code=1)
    img.header.set_xyzt_units("mm", "sec")
    _write_gz_nifti(img, Path(str(stem) + ".nii.gz"))
    Path(str(stem) + ".bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    Path(str(stem) + ".bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")
    Path(str(stem) + ".json").write_text(json.dumps({
        "Synthetic": True,
        "Description": ("Synthetic DWI phantom (cst-integrity pipeline/sims/phantom.py); "
                        "not a scan of a person."),
        "Manufacturer": "synthetic",
        "MagneticFieldStrength": 3,
        "EchoTime": 0.08,
        "RepetitionTime": 8.0,
        "PhaseEncodingDirection": "j-",
        "TotalReadoutTime": 0.05,
        "NoiseModel": f"Rician, SNR {snr:g} on the tissue b0",
    }, indent=2) + "\n")

    (bids_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "CST phantom (synthetic)", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "CC0",
        "GeneratedBy": [{"Name": "cst-integrity pipeline.sims.phantom",
                         "Description": "synthetic diffusion phantom with known CST and lesion"}],
    }, indent=2) + "\n")
    parts = bids_dir / "participants.tsv"
    rows = []
    if parts.exists():
        rows = [r for r in parts.read_text().splitlines()[1:]
                if r and not r.startswith(f"sub-{label}\t")]
    rows.append(f"sub-{label}\tn/a\tn/a\tsynthetic")
    parts.write_text("participant_id\tage\tsex\tgroup\n" + "\n".join(sorted(rows)) + "\n")

    # --- ground truth
    gt_dir = bids_dir / "sourcedata" / "phantom"
    gt_dir.mkdir(parents=True, exist_ok=True)
    truth_lab = tube_lab.copy()[::-1]
    timg = nib.Nifti1Image(truth_lab.astype(np.uint8), aff_store)
    timg.header.set_xyzt_units("mm", "sec")
    _write_gz_nifti(timg, gt_dir / f"sub-{label}_desc-cst_dseg.nii.gz")
    limg = nib.Nifti1Image(lesion_mask[::-1].astype(np.uint8), aff_store)
    limg.header.set_xyzt_units("mm", "sec")
    _write_gz_nifti(limg, gt_dir / f"sub-{label}_desc-lesion_mask.nii.gz")

    cst_fa = {}
    for k, side in enumerate(("L", "R")):
        m = tube_lab == k + 1
        cst_fa[side] = round(float(fa[m].mean()), 4)
    truth = {
        "subject": f"sub-{label}",
        "synthetic": True,
        "seed": seed, "snr": snr, "n_directions": int(len(dirs)),
        "bvalues": sorted({float(b) for b in bvals}),
        "n_volumes": int(len(bvals)),
        "origin_shift_mm": ORIGIN_SHIFT_MM.tolist(),
        "coordinate_note": ("ras_mm = world coordinates of the stored DWI"
                            " = MNI152 mm + origin_shift_mm"),
        "affine": aff_store.tolist(),
        "tube_radius_mm": TUBE_RADIUS_MM,
        "fa_tube": FA_TUBE,
        "md_tissue": MD_TISSUE,
        "cst_true_mean_fa": cst_fa,
        "lesion": truth_lesion,
        "curves": {},
        "files": {
            "dwi": str(Path(str(stem) + ".nii.gz").relative_to(bids_dir)),
            "cst_dseg": f"sourcedata/phantom/sub-{label}_desc-cst_dseg.nii.gz (1 CST_L, 2 CST_R)",
            "lesion_mask": f"sourcedata/phantom/sub-{label}_desc-lesion_mask.nii.gz",
        },
    }
    for side in ("L", "R"):
        pts = curves[side][0][::4]  # every 2 mm
        truth["curves"][side] = {
            "name": f"CST_{side}",
            "control_points_ras_mm": (ctrl_points[side] + ORIGIN_SHIFT_MM).round(2).tolist(),
            "control_points_from": ["upper medulla (extrapolated)"]
                                   + [f"{r}_{side} centroid" for r in ROI_CHAIN]
                                   + ["beyond motor centroid (extrapolated)"],
            "points_ras_mm": (pts + ORIGIN_SHIFT_MM).round(2).tolist(),
            "n_voxels": int((tube_lab == (1 if side == "L" else 2)).sum()),
        }
    (gt_dir / f"sub-{label}_groundtruth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth
