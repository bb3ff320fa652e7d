"""Loading and validating a diffusion scan; gradient-table conventions.

Conventions
-----------
* ``.bvec`` files follow FSL/BIDS: each direction is expressed relative to the
  voxel axes, with the x component flipped when the determinant of the affine
  is positive (FSL's radiological convention).  DIPY fits and tracks in the
  voxel frame, so :func:`fsl_bvecs_to_voxel_frame` is the single place where
  the FSL convention is undone.
* Left and right are only ever decided in world (RAS+, mm) coordinates, using
  the NIfTI affine.
"""

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table

from .errors import InputError

#: Fewest non-collinear diffusion-weighted directions a tensor fit needs.
MIN_DIRECTIONS = 6


def fsl_bvecs_to_voxel_frame(bvecs, affine):
    """Convert FSL/BIDS b-vectors (N, 3) to the voxel-axis frame DIPY uses.

    FSL flips the x component when the affine determinant is positive
    (neurological storage); undoing that flip gives directions along the
    voxel axes.
    """
    bvecs = np.array(bvecs, dtype=float, copy=True)
    if np.linalg.det(affine[:3, :3]) > 0:
        bvecs[:, 0] *= -1
    return bvecs


def voxel_frame_to_fsl_bvecs(bvecs, affine):
    """Inverse of :func:`fsl_bvecs_to_voxel_frame` (the flip is its own inverse)."""
    return fsl_bvecs_to_voxel_frame(bvecs, affine)


def voxel_directions_to_world(vectors, affine):
    """Map unit vectors (..., 3) from the voxel-axis frame to world RAS+ (unit length)."""
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    world = vectors @ linear.T
    norm = np.linalg.norm(world, axis=-1, keepdims=True)
    return np.divide(world, norm, out=np.zeros_like(world), where=norm > 0)


def world_directions_to_voxel(vectors, affine):
    """Inverse of :func:`voxel_directions_to_world` (unit vectors, voxel-axis frame)."""
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = vectors @ np.linalg.inv(linear).T
    norm = np.linalg.norm(voxel, axis=-1, keepdims=True)
    return np.divide(voxel, norm, out=np.zeros_like(voxel), where=norm > 0)


def count_unique_directions(bvecs, bvals, b0_threshold, angle_deg=5.0):
    """Number of distinct diffusion directions (antipodal pairs counted once)."""
    dirs = bvecs[bvals > b0_threshold]
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    unique = []
    cos_limit = np.cos(np.deg2rad(angle_deg))
    for d in dirs:
        if all(abs(float(d @ u)) < cos_limit for u in unique):
            unique.append(d)
    return len(unique)


@dataclass
class DwiScan:
    """A validated diffusion scan (data loaded lazily by nibabel)."""

    img: nib.Nifti1Image
    bvals: np.ndarray
    bvecs_fsl: np.ndarray
    b0_threshold: float
    n_unique_directions: int

    @property
    def affine(self):
        return self.img.affine

    @property
    def b0_mask(self):
        return self.bvals <= self.b0_threshold

    def gradient_table(self):
        """DIPY gradient table in the voxel frame (the frame the data are stored in)."""
        return gradient_table(self.bvals, bvecs=fsl_bvecs_to_voxel_frame(self.bvecs_fsl, self.affine),
                              b0_threshold=self.b0_threshold)


def _read_table(path, what):
    try:
        return np.atleast_1d(np.loadtxt(str(path), dtype=float, ndmin=1))
    except (OSError, ValueError) as exc:
        raise InputError(f"The {what} file cannot be read: {exc}", path=path,
                         fix="bval: one row of numbers; bvec: three rows (FSL format).") from exc


def read_fsl_gradients(bval_path, bvec_path):
    """b-values (N,) in s/mm² and FSL b-vectors (N, 3) from FSL-format files."""
    bvals = _read_table(bval_path, "b-value").ravel()
    bvecs = _read_table(bvec_path, "b-vector")
    if bvecs.ndim == 2 and bvecs.shape[0] == 3:
        bvecs = bvecs.T
    elif not (bvecs.ndim == 2 and bvecs.shape[1] == 3):
        raise InputError(f"The b-vector file has shape {bvecs.shape}; three rows are expected.",
                         path=bvec_path, fix="Write the b-vectors as three rows (FSL format).")
    return bvals, bvecs


def load_dwi(dwi_path, bval_path, bvec_path, *, b0_threshold=50.0, check_data=True):
    """Load a DWI run and check everything a tensor fit and tracking rely on.

    Parameters
    ----------
    dwi_path, bval_path, bvec_path : path-like
        The 4D NIfTI image and its FSL-format gradient files.
    b0_threshold : float
        b-values at or below this (s/mm²) count as b0 (some vendors store the
        b0 as b=1.25 or b=5).
    check_data : bool
        Also read the voxel data to reject non-finite or all-zero images.

    Returns
    -------
    DwiScan

    Raises
    ------
    InputError
        With the offending file and the fix, for any input that cannot be trusted.
    """
    try:
        img = nib.load(str(dwi_path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(f"The diffusion image cannot be read: {exc}", path=dwi_path,
                         fix="Check that the file is a complete NIfTI-1/2 image.") from exc
    if img.ndim != 4:
        raise InputError(f"The diffusion image is {img.ndim}D; a 4D series is needed.",
                         path=dwi_path, fix="Pass the 4D DWI series, not a single volume.")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("The image affine is degenerate or not finite.", path=dwi_path,
                         fix="Repair the NIfTI header (sform/qform) of the image.")
    if np.any(zooms < 0.3) or np.any(zooms > 10.0):
        raise InputError(f"Implausible voxel size {zooms.tolist()} mm.", path=dwi_path,
                         fix="Check the NIfTI header: voxels must be between 0.3 and 10 mm.")
    if min(img.shape[:3]) < 8:
        raise InputError(f"The image grid {img.shape[:3]} is too small for a brain.",
                         path=dwi_path, fix="Pass the whole-brain DWI series.")

    bvals, bvecs = read_fsl_gradients(bval_path, bvec_path)
    n_vols = img.shape[3]
    for table, path, what in ((bvals, bval_path, "b-values"), (bvecs, bvec_path, "b-vectors")):
        if len(table) != n_vols:
            raise InputError(
                f"The image has {n_vols} volumes but the file lists {len(table)} {what}.",
                path=path, fix="Use the .bval/.bvec written together with this image.")
    if not (np.all(np.isfinite(bvals)) and np.all(np.isfinite(bvecs))):
        raise InputError("The gradient files contain non-numbers.", path=bvec_path,
                         fix="Regenerate the .bval/.bvec files.")
    if np.any(bvals < 0):
        raise InputError("Negative b-values.", path=bval_path, fix="b-values must be >= 0.")
    b0 = bvals <= b0_threshold
    if not b0.any():
        raise InputError(f"No b0 volume (no b-value <= {b0_threshold:g} s/mm²).", path=bval_path,
                         fix="Include a b0 volume, or raise --b0-threshold if the b0 is stored "
                             "with a small b-value.")
    if b0.all():
        raise InputError("Every volume is a b0: there is no diffusion weighting.", path=bval_path,
                         fix="Pass the diffusion-weighted series.")
    norms = np.linalg.norm(bvecs[~b0], axis=1)
    if np.any(norms < 0.5) or np.any(norms > 1.5):
        raise InputError("Some diffusion-weighted volumes have a zero or non-unit b-vector.",
                         path=bvec_path, fix="Each b-vector of a b>0 volume must be a unit vector.")
    n_unique = count_unique_directions(bvecs, bvals, b0_threshold)
    if n_unique < MIN_DIRECTIONS:
        raise InputError(
            f"Only {n_unique} distinct diffusion directions; the tensor needs at least "
            f"{MIN_DIRECTIONS}.", path=bvec_path,
            fix="Use a DWI series with 6 or more non-collinear directions.")

    if check_data:
        data = np.asanyarray(img.dataobj)
        if not np.all(np.isfinite(data)):
            raise InputError("The image contains NaN or infinite values.", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
        if not np.any(data):
            raise InputError("The image is all zeros.", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
    return DwiScan(img=img, bvals=bvals, bvecs_fsl=bvecs, b0_threshold=float(b0_threshold),
                   n_unique_directions=n_unique)
