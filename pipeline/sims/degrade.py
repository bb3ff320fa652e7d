"""Degraded copies of a diffusion scan, for validation on clinical-quality data.

Each degradation turns a good research scan into what a clinical protocol would
have acquired from the same head, so that detection can be checked on both:

* :func:`reslice_isotropic` — 3 mm isotropic voxels (DIPY's ``reslice``).
* :func:`direction_subset` — the b0 volumes and 12 well-spread directions of
  the lowest shell.
* :func:`thick_slices` — 5 mm slices along the through-plane axis (the voxel
  axis closest to world z), in-plane sampling kept.
* :func:`add_rician_noise` — Rician noise of a given σ added to magnitude data
  (σ_added = √3 σ_scan doubles the total noise, i.e. halves the SNR).
* :func:`flip_storage_x` — the x storage axis reversed (the same image in the
  world): an invariance check, not a degradation.

The array functions never modify their inputs. World geometry is kept
throughout: the affine is updated with every change of the voxel grid, so a
point keeps its world (RAS+ mm) position, and the voxel axes keep their
directions and signs, so FSL/BIDS b-vectors (relative to the voxel axes, see
:mod:`pipeline.io.dwi`) stay valid unchanged: resampling only rescales the affine's
columns (its determinant keeps its sign); the x storage flip reverses the first
voxel axis *and* the determinant's sign, and FSL's convention (x flipped when
the determinant is positive) absorbs exactly that, so the ``.bvec`` file is
unchanged there too.

:func:`degrade_series` applies one of them by name (or says why it does not
apply to a scan), :func:`read_series` and :func:`write_series` read a BIDS run
and write a one-run BIDS copy of it; the source files are only read.
"""

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..io.dwi import B0_THRESHOLD, count_unique_directions, read_fsl_gradients
from ..preprocessing.mask import axial_axis
from ..reconstruction.tensor import SHELL_TOLERANCE

#: The degradations :func:`degrade_series` knows, in the order the validation runs them.
DEGRADATIONS = ("3mm", "12dir", "5mm", "lowsnr", "xflip")
#: Voxel edge (mm) of the ``3mm`` copy, directions kept by ``12dir``, slice thickness
#: (mm) of ``5mm``, noise factor of ``lowsnr`` (total σ / σ of the scan).
ISOTROPIC_MM = 3.0
N_DIRECTIONS = 12
SLICE_MM = 5.0
NOISE_FACTOR = 2.0
#: A scan whose voxels are within this of the target (mm) already is "3 mm" / "5 mm".
VOXEL_TOLERANCE_MM = 0.05


def voxel_sizes(affine):
    """Voxel edge lengths (mm) along the three voxel axes of ``affine`` (column norms)."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _box_prefilter(data, zooms, new_zooms):
    """Blur ``data`` (X, Y, Z[, N]) along the axes whose voxels grow.

    A voxel of edge ``a`` integrates the signal over a box of width ``a`` (variance
    a²/12). A Gaussian of variance (A² − a²)/12 mm² makes that a box of width ``A``
    to second order, so that the coarse samples see the partial volume a coarse
    acquisition would, rather than aliased point samples.
    """
    ratio = np.asarray(new_zooms, float) / np.asarray(zooms, float)
    sigma = np.sqrt(np.clip(ratio ** 2 - 1.0, 0.0, None) / 12.0)
    if not np.any(sigma > 0):
        return np.asarray(data, dtype=np.float32)
    sigma = list(sigma) + [0.0] * (np.ndim(data) - 3)
    return ndimage.gaussian_filter(np.asarray(data, dtype=np.float32), sigma, mode="nearest")


def _resample(data, affine, new_zooms, *, prefilter, order):
    from dipy.align.reslice import reslice

    zooms = voxel_sizes(affine)
    if prefilter:
        data = _box_prefilter(data, zooms, new_zooms)
    resliced, new_affine = reslice(np.asarray(data, dtype=np.float32), np.asarray(affine, float),
                                   zooms, new_zooms, order=order, mode="nearest")
    return resliced, new_affine


def reslice_isotropic(data, affine, voxel_mm=ISOTROPIC_MM, *, prefilter=True, order=1):
    """Resample a 3D/4D image to isotropic voxels (DIPY's ``reslice``).

    Parameters
    ----------
    data : ndarray (X, Y, Z[, N])
        Signal (any units; float32 is returned).
    affine : ndarray (4, 4)
        Voxel → world RAS+ mm.
    voxel_mm : float
        New voxel edge, mm.
    prefilter : bool
        Blur along the axes whose voxels grow first (:func:`_box_prefilter`), so each
        new voxel averages over its own width like an acquired one.
    order : int
        Spline order of the interpolation (1: trilinear).

    Returns
    -------
    data : float32 ndarray (X', Y', Z'[, N]), X' = round(X · zoom_x / voxel_mm)
    affine : ndarray (4, 4)
        ``affine @ diag(voxel_mm / zooms, 1)``: the voxel axes keep their world
        directions and signs, and voxel (0, 0, 0) its world position, so every point
        keeps its world position.
    """
    return _resample(data, affine, np.full(3, float(voxel_mm)), prefilter=prefilter, order=order)


def thick_slices(data, affine, thickness_mm=SLICE_MM, *, axis=None, prefilter=True, order=1):
    """Resample the slice axis to ``thickness_mm`` slices, in-plane sampling kept.

    Parameters
    ----------
    data : ndarray (X, Y, Z[, N])
    affine : ndarray (4, 4), voxel → world RAS+ mm
    thickness_mm : float
        New slice thickness (and spacing), mm.
    axis : int, optional
        The through-plane voxel axis; default: the one closest to world z
        (:func:`pipeline.preprocessing.mask.axial_axis`), as in axial clinical protocols.
    prefilter, order : see :func:`reslice_isotropic`. The prefilter makes each new
        slice average over its 5 mm (partial volume through the slice).

    Returns
    -------
    data : float32 ndarray, only the slice axis changed in length
    affine : ndarray (4, 4), only the slice axis' column rescaled
    """
    axis = axial_axis(affine) if axis is None else int(axis)
    new_zooms = voxel_sizes(affine)
    new_zooms[axis] = float(thickness_mm)
    return _resample(data, affine, new_zooms, prefilter=prefilter, order=order)


def lowest_shell(bvals, *, b0_threshold=B0_THRESHOLD, shell_tolerance=SHELL_TOLERANCE):
    """Indices of the diffusion-weighted volumes of the lowest shell (b in s/mm²)."""
    bvals = np.asarray(bvals, dtype=float)
    weighted = bvals > b0_threshold
    if not weighted.any():
        return np.array([], dtype=int)
    lowest = bvals[weighted].min()
    return np.flatnonzero(weighted & (bvals <= lowest + shell_tolerance))


def _line_angles(units):
    """Angles (rad) between the lines through unit vectors (antipodes are one line)."""
    return np.arccos(np.clip(np.abs(units @ units.T), 0.0, 1.0))


def _antipodal_energy(units):
    """Electrostatic energy of the points ±units on the sphere (lower: better spread)."""
    diff = np.linalg.norm(units[:, None] - units[None], axis=-1)
    summ = np.linalg.norm(units[:, None] + units[None], axis=-1)
    upper = np.triu_indices(len(units), 1)
    return float(np.sum(1.0 / np.maximum(diff[upper], 1e-9)) +
                 np.sum(1.0 / np.maximum(summ[upper], 1e-9)))


def direction_subset(bvals, bvecs, n_directions=N_DIRECTIONS, *, b0_threshold=B0_THRESHOLD,
                     shell_tolerance=SHELL_TOLERANCE):
    """Volumes to keep: every b0 and ``n_directions`` well-spread ones of the lowest shell.

    Greedy farthest-point selection on the sphere with antipodal symmetry (the
    distance of two directions is the angle between their lines, so ``g`` and
    ``-g`` count as one): from a start direction, the next is always the one
    farthest from all chosen so far. Every start is tried; the subset with the
    largest smallest angle wins, ties by the lower antipodal electrostatic energy,
    then by the lower start index: deterministic for a given table. Repeated
    directions are never chosen twice.

    Parameters
    ----------
    bvals : ndarray (N,), s/mm²
    bvecs : ndarray (N, 3)
        Any orthonormal frame (FSL's voxel-axis frame is fine: angles are the same).
    n_directions : int
    b0_threshold, shell_tolerance : float, s/mm²

    Returns
    -------
    ndarray of int, sorted volume indices (b0 volumes and the chosen directions).

    Raises
    ------
    ValueError
        The lowest shell has fewer than ``n_directions`` distinct directions.
    """
    bvals = np.asarray(bvals, dtype=float)
    shell = lowest_shell(bvals, b0_threshold=b0_threshold, shell_tolerance=shell_tolerance)
    units = np.asarray(bvecs, dtype=float)[shell]
    units = units / np.linalg.norm(units, axis=1, keepdims=True)
    angles = _line_angles(units)
    distinct = np.deg2rad(1.0)
    best_key, best = None, None
    for start in range(len(shell)):
        chosen = [start]
        nearest = angles[start].copy()
        while len(chosen) < n_directions:
            candidate = int(np.argmax(nearest))  # ties: the lowest index
            if nearest[candidate] < distinct:
                break
            chosen.append(candidate)
            nearest = np.minimum(nearest, angles[candidate])
        if len(chosen) < n_directions:
            continue
        sub = angles[np.ix_(chosen, chosen)] + np.eye(n_directions) * np.pi
        key = (-round(float(sub.min()), 6), _antipodal_energy(units[chosen]))
        if best_key is None or key < best_key:
            best_key, best = key, chosen
    if best is None:
        raise ValueError(f"the lowest shell has fewer than {n_directions} distinct directions")
    b0 = np.flatnonzero(bvals <= b0_threshold)
    return np.sort(np.concatenate([b0, shell[best]]))


def add_rician_noise(data, sigma, *, seed=0):
    """Magnitude data with Rician noise of ``sigma`` added.

    ``sqrt((S + σ n₁)² + (σ n₂)²)`` with independent standard normal n₁, n₂: the
    magnitude of the complex signal plus complex Gaussian noise. Added to data that
    already carry noise σ₀ the total is √(σ₀² + σ²) where the SNR is high; with
    σ = √3 σ₀ it is 2 σ₀ (the SNR halved).

    Parameters
    ----------
    data : ndarray
        Magnitude signal (signal units), any shape.
    sigma : float or ndarray broadcastable to ``data``
        Standard deviation of each of the two Gaussian components (signal units).
    seed : int
        Seed of the random generator (the same seed gives the same noise).

    Returns
    -------
    float32 ndarray like ``data``.
    """
    rng = np.random.default_rng(seed)
    signal = np.asarray(data, dtype=np.float32)
    sigma = np.asarray(sigma, dtype=np.float32)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


def flip_storage_x(data, affine):
    """The same image with the x storage axis reversed (voxel i → n − 1 − i).

    Parameters
    ----------
    data : ndarray (X, Y, Z[, N])
    affine : ndarray (4, 4), voxel → world RAS+ mm

    Returns
    -------
    data : ndarray, ``data[::-1]``
    affine : ndarray (4, 4)
        ``affine @ F`` with F: i' = n − 1 − i. Each voxel keeps its world position;
        the determinant changes sign, and FSL/BIDS b-vectors stay as they are.
    """
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, np.shape(data)[0] - 1
    return np.asarray(data)[::-1].copy(), np.asarray(affine, float) @ flip


def estimate_noise_sigma(data, bvals, affine, *, b0_threshold=B0_THRESHOLD):
    """The scan's noise σ (signal units) as the pipeline estimates it.

    Median over the brain mask (:func:`pipeline.preprocessing.mask.brain_mask`) of the
    MP-PCA noise map (:func:`pipeline.preprocessing.denoise.denoise_dwi`), the value the
    pipeline reports as ``qc.noise.noise_sigma_median``.
    """
    from ..preprocessing.denoise import denoise_dwi
    from ..preprocessing.mask import brain_mask, mean_b0, mean_dwi

    data = np.asarray(data, dtype=np.float32)
    b0 = np.asarray(bvals, float) <= b0_threshold
    mask = brain_mask(mean_b0(data, b0), mean_dwi(data, b0), affine)
    _, sigma = denoise_dwi(data, mask, bvals, method="mppca", n_jobs=1)
    return float(np.median(sigma[mask]))


@dataclass(frozen=True)
class Series:
    """A 4D diffusion series in memory: signal (float32, scaled), geometry, gradients."""

    data: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs_fsl: np.ndarray  # (N, 3), FSL/BIDS convention
    header: nib.Nifti1Header  # of the source (on-disk data type, units, slice info)


def read_series(dwi_path):
    """:class:`Series` of a BIDS DWI run (its ``.bval``/``.bvec`` next to it)."""
    dwi_path = Path(dwi_path)
    img = nib.load(str(dwi_path))
    base = str(dwi_path)[: -len(".nii.gz")] if dwi_path.name.endswith(".gz") else \
        str(dwi_path)[: -len(".nii")]
    bvals, bvecs = read_fsl_gradients(f"{base}.bval", f"{base}.bvec")
    return Series(img.get_fdata(dtype=np.float32), img.affine.copy(), bvals, bvecs,
                  img.header.copy())


def skip_reason(name, affine, bvals, bvecs_fsl, *, b0_threshold=B0_THRESHOLD):
    """Why degradation ``name`` does not apply to a scan (None when it does).

    ``3mm``: every voxel edge already ≥ 3 mm; ``12dir``: ≤ 12 distinct directions
    already; ``5mm``: slices (the voxel axis closest to world z) already ≥ 5 mm.
    Needs only the geometry and gradient table, not the data.
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; use one of {DEGRADATIONS}")
    zooms = voxel_sizes(affine)
    if name == "3mm" and np.all(zooms >= ISOTROPIC_MM - VOXEL_TOLERANCE_MM):
        return f"voxels already {np.round(zooms, 2).tolist()} mm"
    if name == "12dir":
        n_unique = count_unique_directions(np.asarray(bvecs_fsl, float),
                                           np.asarray(bvals, float), b0_threshold)
        if n_unique <= N_DIRECTIONS:
            return f"{n_unique} directions already"
    if name == "5mm":
        axis = axial_axis(affine)
        if zooms[axis] >= SLICE_MM - VOXEL_TOLERANCE_MM:
            return f"slices already {zooms[axis]:.2f} mm"
    return None


def degrade_series(series, name, *, b0_threshold=B0_THRESHOLD, noise_sigma=None, seed=0):
    """``series`` degraded by ``name`` (one of :data:`DEGRADATIONS`).

    Parameters
    ----------
    series : :class:`Series`
    name : str
    b0_threshold : float, s/mm²
    noise_sigma : float
        ``lowsnr`` only: the scan's own noise σ (signal units; e.g.
        :func:`estimate_noise_sigma` of the unmodified scan). √(NOISE_FACTOR² − 1)·σ
        is added.
    seed : int
        ``lowsnr`` only.

    Returns
    -------
    (Series, dict) : the degraded series and what was done (JSON-ready), or
    (None, dict) with ``skipped`` saying why when the scan already is that coarse.
    """
    reason = skip_reason(name, series.affine, series.bvals, series.bvecs_fsl,
                         b0_threshold=b0_threshold)
    if reason is not None:
        return None, {"skipped": reason}
    zooms = voxel_sizes(series.affine)
    if name == "3mm":
        data, affine = reslice_isotropic(series.data, series.affine, ISOTROPIC_MM)
        return replace(series, data=data, affine=affine), {
            "voxel_mm_before": np.round(zooms, 3).tolist(), "voxel_mm": [ISOTROPIC_MM] * 3}
    if name == "12dir":
        keep = direction_subset(series.bvals, series.bvecs_fsl, N_DIRECTIONS,
                                b0_threshold=b0_threshold)
        return replace(series, data=series.data[..., keep], bvals=series.bvals[keep],
                       bvecs_fsl=series.bvecs_fsl[keep]), {
            "directions_before": count_unique_directions(series.bvecs_fsl, series.bvals,
                                                         b0_threshold),
            "volumes_kept": keep.tolist()}
    if name == "5mm":
        axis = axial_axis(series.affine)
        data, affine = thick_slices(series.data, series.affine, SLICE_MM, axis=axis)
        return replace(series, data=data, affine=affine), {
            "slice_axis": axis, "slice_mm_before": round(float(zooms[axis]), 3),
            "slice_mm": SLICE_MM}
    if name == "lowsnr":
        if noise_sigma is None:
            raise ValueError("lowsnr needs the scan's noise_sigma")
        added = float(noise_sigma) * np.sqrt(NOISE_FACTOR ** 2 - 1.0)
        return replace(series, data=add_rician_noise(series.data, added, seed=seed)), {
            "noise_sigma_scan": round(float(noise_sigma), 4),
            "noise_sigma_added": round(added, 4), "seed": int(seed)}
    if name == "xflip":
        data, affine = flip_storage_x(series.data, series.affine)
        return replace(series, data=data, affine=affine), {"storage": "x axis reversed"}
    raise ValueError(f"unknown degradation {name!r}; use one of {DEGRADATIONS}")


def write_series(series, dwi_dir, stem, *, sidecar=None, note=None):
    """Write ``series`` as a BIDS run ``<dwi_dir>/<stem>_dwi.{nii.gz,bval,bvec,json}``.

    The image keeps the source's on-disk data type (nibabel chooses the scaling),
    units and slice information; sform and qform both hold the new affine. The
    ``.bvec`` is written in the FSL/BIDS convention as given. ``sidecar`` (the
    source's JSON sidecar, a path) is copied with ``note`` added under
    ``"CstValidation"``; ``SliceTiming`` is dropped when the slice count changed.
    The image is written last, under a temporary name, so a complete image means
    a complete run.
    """
    dwi_dir = Path(dwi_dir)
    dwi_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(dwi_dir / f"{stem}_dwi.bval", series.bvals[None], fmt="%g")
    np.savetxt(dwi_dir / f"{stem}_dwi.bvec", series.bvecs_fsl.T, fmt="%.8f")
    meta = {}
    if sidecar is not None and Path(sidecar).is_file():
        meta = json.loads(Path(sidecar).read_text())
    if "SliceTiming" in meta and len(meta["SliceTiming"]) != series.data.shape[2]:
        del meta["SliceTiming"]
    if note is not None:
        meta["CstValidation"] = note
    (dwi_dir / f"{stem}_dwi.json").write_text(json.dumps(meta, indent=1, default=str))
    header = series.header.copy()
    header.set_data_shape(series.data.shape)
    img = nib.Nifti1Image(series.data, series.affine, header)
    img.set_data_dtype(series.header.get_data_dtype())
    _, qcode = series.header.get_qform(coded=True)
    _, scode = series.header.get_sform(coded=True)
    img.set_qform(series.affine, code=int(qcode) or 1)
    img.set_sform(series.affine, code=int(scode) or 1)
    img.header.set_zooms(tuple(voxel_sizes(series.affine)) + tuple(header.get_zooms()[3:4]))
    partial = dwi_dir / f".{stem}_dwi.partial.nii.gz"
    nib.save(img, str(partial))
    partial.replace(dwi_dir / f"{stem}_dwi.nii.gz")
    return dwi_dir / f"{stem}_dwi.nii.gz"


def link_run(dwi_path, dwi_dir):
    """A one-run BIDS copy of an unmodified run: symbolic links to its four files."""
    dwi_path = Path(dwi_path).absolute()
    dwi_dir = Path(dwi_dir)
    dwi_dir.mkdir(parents=True, exist_ok=True)
    base = dwi_path.name[: -len(".nii.gz")] if dwi_path.name.endswith(".gz") else \
        dwi_path.name[: -len(".nii")]
    for source in sorted(dwi_path.parent.glob(f"{base}.*")):
        target = dwi_dir / source.name
        if not target.exists():
            target.symlink_to(source)
    return dwi_dir / dwi_path.name


def start_bids_copy(source_bids, copy_root):
    """``copy_root`` as a BIDS dataset root: the source's ``dataset_description.json``."""
    copy_root = Path(copy_root)
    copy_root.mkdir(parents=True, exist_ok=True)
    description = Path(source_bids) / "dataset_description.json"
    if description.is_file() and not (copy_root / description.name).is_file():
        shutil.copyfile(description, copy_root / description.name)
    return copy_root
