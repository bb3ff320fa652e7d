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
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table

from .errors import InputError

#: Fewest non-collinear diffusion-weighted directions a tensor fit needs.
MIN_DIRECTIONS = 6
#: Plausible voxel edge lengths (mm), checked in the header and in the affine.
MIN_VOXEL_MM, MAX_VOXEL_MM = 0.3, 10.0
#: Largest plausible b-value (s/mm²); larger ones are in the wrong unit.
MAX_BVALUE = 50000.0
#: Float32 copies of the 4D series the pipeline holds at its peak (for the memory estimate).
WORKING_COPIES = 6


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
        if not Path(path).read_text().strip():
            raise InputError(f"The {what} file is empty.", path=path,
                             fix="bval: one row of numbers; bvec: three rows (FSL format).")
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


def available_memory_bytes():
    """Bytes this process can still use: MemAvailable capped by a cgroup limit (None: unknown).

    Reclaimable page cache (``inactive_file``) counts as available inside a cgroup too.
    """
    known = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for folder, limit_name, usage_name, cache_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file")):
        try:
            limit = Path(folder, limit_name).read_text().strip()
            if limit == "max" or int(limit) >= 2 ** 60:
                continue  # no limit
            used = int(Path(folder, usage_name).read_text().strip())
            stat = dict(line.split() for line in
                        Path(folder, "memory.stat").read_text().splitlines() if " " in line)
            used -= int(stat.get(cache_key, 0))
            known.append(max(0, int(limit) - used))
            break
        except (OSError, ValueError):
            continue
    return min(known) if known else None


def estimated_memory_bytes(shape):
    """Peak memory the pipeline needs for a 4D series of ``shape`` (float32 working copies)."""
    return int(np.prod([int(n) for n in shape], dtype=np.float64)) * 4 * WORKING_COPIES


def _gib(n_bytes):
    return f"{n_bytes / 2 ** 30:.2f} GiB" if n_bytes >= 0.01 * 2 ** 30 else "<0.01 GiB"


def _load_image(dwi_path):
    """nibabel image of ``dwi_path``, with the reason spelled out when the file is unusable."""
    dwi_path = Path(dwi_path)
    readable_fix = "Check that the file is a complete NIfTI-1/2 image (re-export it if needed)."
    try:
        size = dwi_path.stat().st_size
        with open(dwi_path, "rb") as handle:
            magic = handle.read(2)
    except OSError as exc:
        raise InputError(f"The diffusion image cannot be opened: {exc.strerror or exc}",
                         path=dwi_path, fix=readable_fix) from exc
    if size == 0:
        raise InputError("The diffusion image is an empty file (0 bytes).", path=dwi_path,
                         fix=readable_fix)
    if dwi_path.name.endswith(".gz") and magic != b"\x1f\x8b":
        raise InputError("The diffusion image is named .nii.gz but is not gzip-compressed.",
                         path=dwi_path, fix="Rename it to .nii, or compress it with gzip.")
    try:
        img = nib.load(str(dwi_path))
        img.header.get_zooms()
        img.affine  # noqa: B018  (parse the header fully now, not later)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(f"The diffusion image cannot be read ({type(exc).__name__}: {exc}).",
                         path=dwi_path, fix=readable_fix) from exc
    return img


def load_dwi(dwi_path, bval_path, bvec_path, *, b0_threshold=50.0, check_data=True,
             memory_limit_bytes=None):
    """Load a DWI run and check everything a tensor fit and tracking rely on.

    Parameters
    ----------
    dwi_path, bval_path, bvec_path : path-like
        The 4D NIfTI image and its FSL-format gradient files.
    b0_threshold : float
        b-values at or below this (s/mm²) count as b0 (some vendors store the
        b0 as b=1.25 or b=5).
    check_data : bool
        Also read the voxel data to reject unreadable (truncated), non-finite or
        all-zero images.
    memory_limit_bytes : int, optional
        Memory the run may use; default: what the machine has available now
        (``MemAvailable``, capped by a cgroup limit).  The estimate (see
        :func:`estimated_memory_bytes`) is checked from the header, before any
        voxel is read, when ``check_data`` is true or a limit is given (the
        pipeline's own reloads, ``check_data=False``, do not repeat it while
        other steps hold memory).

    Returns
    -------
    DwiScan

    Raises
    ------
    InputError
        With the offending file and the fix, for any input that cannot be trusted.
    """
    img = _load_image(dwi_path)
    if img.ndim != 4:
        raise InputError(f"The diffusion image is {img.ndim}D (shape {img.shape}); a 4D series "
                         "is needed.", path=dwi_path,
                         fix="Pass the 4D DWI series, not a single volume.")
    # the affine first: the voxel size and every world coordinate depend on it
    affine = np.asarray(img.affine, dtype=float)
    header_fix = "Repair the NIfTI header (sform/qform) of the image, or re-export it."
    if not np.all(np.isfinite(affine)):
        raise InputError("The image affine (sform/qform) contains NaN or infinite values.",
                         path=dwi_path, fix=header_fix)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("The image affine (sform/qform) is singular (a zero or repeated axis).",
                         path=dwi_path, fix=header_fix)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)):
        raise InputError(f"The voxel size in the header is not a number: {zooms.tolist()}.",
                         path=dwi_path, fix="Repair the voxel size (pixdim) in the NIfTI header, "
                                            "or re-export the image.")
    axis_mm = np.linalg.norm(affine[:3, :3], axis=0)
    for sizes, where in ((zooms, "header (pixdim)"), (axis_mm, "affine")):
        if np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
            raise InputError(
                f"Implausible voxel size {np.round(sizes, 4).tolist()} mm in the {where}.",
                path=dwi_path, fix=f"Check the NIfTI header: voxels must be between "
                                   f"{MIN_VOXEL_MM:g} and {MAX_VOXEL_MM:g} mm.")
    if min(img.shape[:3]) < 8:
        raise InputError(f"The image grid {img.shape[:3]} is too small for a brain.",
                         path=dwi_path, fix="Pass the whole-brain DWI series.")
    if img.shape[3] < 2:
        raise InputError(f"The diffusion series has {img.shape[3]} volume(s).", path=dwi_path,
                         fix="Pass the whole DWI series (b0 and diffusion-weighted volumes).")
    needed = estimated_memory_bytes(img.shape)
    available = (memory_limit_bytes if memory_limit_bytes is not None else
                 available_memory_bytes() if check_data else None)
    if available is not None and needed > available:
        raise InputError(
            f"Processing this image (grid {tuple(img.shape)}) needs about {_gib(needed)} but only "
            f"{_gib(available)} are available.", path=dwi_path,
            fix="Run on a machine with more memory, or crop the field of view.")

    bvals, bvecs = read_fsl_gradients(bval_path, bvec_path)
    n_vols = img.shape[3]
    for table, path, what in ((bvals, bval_path, "b-values"), (bvecs, bvec_path, "b-vectors")):
        if len(table) != n_vols:
            raise InputError(
                f"The image has {n_vols} volumes but the file lists {len(table)} {what}.",
                path=path, fix="Use the .bval/.bvec written together with this image.")
    for table, path, what in ((bvals, bval_path, "b-value"), (bvecs, bvec_path, "b-vector")):
        if not np.all(np.isfinite(table)):
            raise InputError(f"The {what} file contains NaN or infinite values.", path=path,
                             fix="Regenerate the .bval/.bvec files from the scanner data.")
    if np.any(bvals < 0):
        raise InputError("Negative b-values.", path=bval_path, fix="b-values must be >= 0.")
    if bvals.max() > MAX_BVALUE:
        raise InputError(
            f"b-values up to {bvals.max():g}: far beyond any diffusion scan (in s/mm²).",
            path=bval_path, fix="Write the b-values in s/mm² (typically 0 and 700-3000).")
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
        bad = int(np.flatnonzero(~b0)[(norms < 0.5) | (norms > 1.5)][0])
        raise InputError(
            f"Some diffusion-weighted volumes have a zero or non-unit b-vector (volume {bad}: "
            f"length {np.linalg.norm(bvecs[bad]):.3g}).", path=bvec_path,
            fix="Each b-vector of a b>0 volume must be a unit vector.")
    n_unique = count_unique_directions(bvecs, bvals, b0_threshold)
    if n_unique < MIN_DIRECTIONS:
        raise InputError(
            f"Only {n_unique} distinct diffusion directions; the tensor needs at least "
            f"{MIN_DIRECTIONS}.", path=bvec_path,
            fix="Use a DWI series with 6 or more non-collinear directions.")

    if check_data:
        try:
            data = np.asanyarray(img.dataobj)
        except MemoryError as exc:
            raise InputError(f"Not enough memory to read the image (grid {tuple(img.shape)}).",
                             path=dwi_path, fix="Run on a machine with more memory, or crop "
                                                "the field of view.") from exc
        except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError, ValueError
            raise InputError(
                f"The voxel data cannot be read; the file is truncated or corrupt "
                f"({type(exc).__name__}: {exc}).", path=dwi_path,
                fix="Copy or re-export the complete image (compare its size with the "
                    "original).") from exc
        if not np.all(np.isfinite(data)):
            raise InputError("The image contains NaN or infinite values.", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
        if not np.any(data):
            raise InputError("The image is all zeros.", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
    return DwiScan(img=img, bvals=bvals, bvecs_fsl=bvecs, b0_threshold=float(b0_threshold),
                   n_unique_directions=n_unique)
