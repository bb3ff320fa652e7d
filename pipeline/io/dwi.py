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

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table

from ..errors import InputError

#: b-values (s/mm²) at or below this count as b0 by default: some vendors store the b0 as
#: b=1.25 or b=5 (the command line's ``--b0-threshold``).
B0_THRESHOLD = 50.0
#: Fewest non-collinear diffusion-weighted directions a tensor fit needs.
MIN_DIRECTIONS = 6
#: Plausible voxel edge lengths (mm), checked in the header and in the affine.
MIN_VOXEL_MM, MAX_VOXEL_MM = 0.3, 10.0
#: Largest plausible b-value (s/mm²); larger ones are in the wrong unit.
MAX_BVALUE = 50000.0
#: Largest difference (mm) tolerated between the sform's and the qform's origins, and between
#: the header's voxel size (pixdim) and the affine's: both are stored as float32, exact to
#: about 1e-5 mm over a head-sized field of view, so anything larger was written differently.
HEADER_TOL_MM = 0.01
#: Largest rotation (degrees) tolerated between the sform and the qform, and largest departure
#: from 90° between voxel axes (shear).  The qform is a float32 quaternion whose first
#: component is recomputed from the other three: near 180° rotations (LAS storage) that loses
#: up to ~0.05° (sub-philips03: 0.054°, exactly what nibabel gets storing its sform as a qform).
HEADER_TOL_DEG = 0.1
#: Largest value of the float32 arrays the pipeline computes in.
FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    """A validated diffusion scan (data loaded lazily by nibabel).

    ``header_warnings`` lists what in the image header was accepted but deserves a note in
    the QC (see :func:`check_header`).
    """

    img: nib.Nifti1Image
    bvals: np.ndarray
    bvecs_fsl: np.ndarray
    b0_threshold: float
    n_unique_directions: int
    header_warnings: tuple = ()

    @property
    def affine(self):
        return self.img.affine

    @property
    def b0_mask(self):
        return self.bvals <= self.b0_threshold

    def gradient_table(self):
        """DIPY gradient table in the voxel frame (the frame the data are stored in)."""
        return gradient_table(self.bvals,
                              bvecs=fsl_bvecs_to_voxel_frame(self.bvecs_fsl, self.affine),
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


def _gib(n_bytes):
    return f"{n_bytes / 2 ** 30:.2f} GiB" if n_bytes >= 0.01 * 2 ** 30 else "<0.01 GiB"


@contextmanager
def _nibabel_repairs_unprinted():
    """Keep nibabel from printing the header faults it repairs on loading (a zero or
    negative pixdim, an unknown xform code): :func:`check_header` reports them, as the one
    refusal or as QC warnings.  (nibabel's own ``LoggingOutputSuppressor`` drops its
    handler for good, after which Python prints the messages anyway.)"""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        with _nibabel_repairs_unprinted():
            img = nib.load(str(dwi_path))
        img.header.get_zooms()
        img.affine  # noqa: B018  (parse the header fully now, not later)
    except nib.spatialimages.HeaderDataError as exc:  # e.g. an infinite scl_inter
        raise InputError(f"The diffusion image's header is invalid ({exc}).", path=dwi_path,
                         fix="Repair the NIfTI header, or re-convert the scan from DICOM "
                             "(e.g. with dcm2niix).") from exc
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(f"The diffusion image cannot be read ({type(exc).__name__}: {exc}).",
                         path=dwi_path, fix=readable_fix) from exc
    return img


def _stored_header(dwi_path, img):
    """The header of ``dwi_path`` exactly as stored, before nibabel's repairs on loading
    (which turn a zero pixdim into 1 and a negative one positive, and drop ``scl_slope``)."""
    with nib.openers.ImageOpener(str(dwi_path)) as handle:
        return img.header_class.from_fileobj(handle, check=False)


def _rotation(affine):
    """The rotation (with a mirror for a left-handed affine) closest to the affine's voxel
    axes: the polar decomposition of its unit columns, as nibabel strips a shear when it
    stores an affine as a qform."""
    u, _, vt = np.linalg.svd(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    return u @ vt


def _axis_angles_deg(affine):
    """Angle (degrees) between each pair of voxel axes of ``affine``: 90 without shear."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return [float(np.degrees(np.arccos(np.clip(axes[:, i] @ axes[:, j], -1.0, 1.0))))
            for i, j in ((0, 1), (0, 2), (1, 2))]


def _xform_warnings(header):
    """Warnings about the sform and qform of a header whose two codes are both set."""
    sform = header.get_sform()
    try:
        qform = header.get_qform()
    except Exception as exc:  # noqa: BLE001 - nibabel: an impossible quaternion, for one
        return [f"The header's qform is invalid ({exc}); the sform is used."]
    if not np.all(np.isfinite(qform)):
        return ["The header's qform holds NaN or infinite values; the sform is used."]
    copy_fix = ("If the sform is right, copy it into the qform (`fslorient -copysform2qform`); "
                "else re-convert the scan from DICOM (e.g. with dcm2niix).")
    rotation_s, rotation_q = _rotation(sform), _rotation(qform)
    if np.linalg.det(rotation_s) * np.linalg.det(rotation_q) < 0:
        return ["The header's sform and qform are mirror images of each other: they disagree "
                "on which side is left. The sform is used (as nibabel and BIDS tools do), but "
                "tools that read the qform (ITK, ANTs) see left and right swapped. Check which "
                "is right against a marker or the scanner's images. " + copy_fix]
    shift_mm = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    cos_angle = (np.trace(rotation_s @ rotation_q.T) - 1.0) / 2.0
    angle_deg = float(np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0))))
    if shift_mm > HEADER_TOL_MM or angle_deg > HEADER_TOL_DEG:
        return [f"The header's sform and qform disagree (origins {shift_mm:.3g} mm apart, "
                f"axes {angle_deg:.3g}° apart; tolerated: {HEADER_TOL_MM:g} mm, "
                f"{HEADER_TOL_DEG:g}°). The sform is used (as nibabel and BIDS tools do); tools "
                f"that read the qform (ITK, ANTs) place the image differently. " + copy_fix]
    return []


def check_header(img, dwi_path):
    """Refuse an image whose header cannot be trusted; note what can be used but is odd.

    In the spirit of nipreps' ``ValidateImage``, checked from the header alone: the voxel
    type (real numbers), the dimensions (4D; a trailing fifth dimension of length 1 is
    dropped), the stored voxel size (``pixdim``, before nibabel's repairs), the scaling
    (``scl_slope``), that the orientation is known (``sform_code`` or ``qform_code`` set)
    and that the affine nibabel uses (the sform when its code is set, else the qform) is
    finite, invertible and of plausible voxel size.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The image as loaded by nibabel (NIfTI-1 or NIfTI-2).
    dwi_path : path-like
        Its file: named in the errors, and read again for the header as stored.

    Returns
    -------
    img : nibabel.Nifti1Image
        ``img``, or a 4D view of it when it had a trailing fifth dimension of length 1.
    warnings : list of str
        What was accepted but belongs in the QC: sform and qform that disagree, a sheared
        affine, a voxel size in ``pixdim`` unlike the affine's, a fault nibabel repaired.

    Raises
    ------
    InputError
        Naming ``dwi_path`` and the fix.
    """
    stored = _stored_header(dwi_path, img)
    dtype, datatype = img.get_data_dtype(), img.header.get_value_label("datatype")
    if dtype.kind == "c":  # nibabel's get_fdata would silently drop the imaginary part
        raise InputError(
            f"The diffusion image stores complex voxel values ({datatype}); the pipeline "
            f"needs real-valued magnitude images.", path=dwi_path,
            fix="Save the magnitude of the complex series (e.g. `fslcomplex -realabs`, or "
                "np.abs in nibabel), or export magnitude images from the scanner (dcm2niix's "
                "default).")
    if dtype.kind not in "iuf":
        raise InputError(
            f"The diffusion image stores non-numeric voxel values ({datatype}); the pipeline "
            f"needs real-valued magnitude images.", path=dwi_path,
            fix="Re-export the series as integer or floating-point magnitude images.")
    # a trailing fifth axis of length 1 (some converters write one) carries nothing
    squeeze = img.ndim == 5 and img.shape[4] == 1
    if img.ndim > 4 and not squeeze:
        raise InputError(
            f"The diffusion image is {img.ndim}D (shape {img.shape}); a 4D series (x, y, z, "
            f"volume) is needed.", path=dwi_path,
            fix="Store the volumes along the fourth axis only (e.g. reshape the data to "
                "(x, y, z, volumes) with nibabel, or re-convert with dcm2niix).")
    if img.ndim < 4:
        raise InputError(f"The diffusion image is {img.ndim}D (shape {img.shape}); a 4D series "
                         "is needed.", path=dwi_path,
                         fix="Pass the 4D DWI series, not a single volume.")
    pixdim = np.asarray(stored["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        # nibabel would read a zero as 1 mm and a negative size as positive: a guess
        raise InputError(
            f"The voxel size in the header (pixdim[1:4] = {pixdim.tolist()} mm) is zero, "
            f"negative, infinite or not a number.", path=dwi_path,
            fix="Write the true voxel size into the header (re-convert from DICOM, e.g. with "
                "dcm2niix, or set it with nibabel's header.set_zooms()).")
    slope = float(stored["scl_slope"])
    if np.isinf(slope):
        # nibabel ignores an infinite slope and reads the unscaled values: also a guess
        raise InputError(
            "The header's scl_slope is infinite: scaled by it, every voxel value is infinite.",
            path=dwi_path,
            fix="Set scl_slope to the true scale factor (0 or 1 for unscaled data), or "
                "re-convert the scan from DICOM (e.g. with dcm2niix).")
    header = img.header
    # nibabel reads a code outside the NIfTI list (1-4) as 0, "unknown"; the message names
    # the codes as stored
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise InputError(
            f"The header gives no orientation (sform_code {int(stored['sform_code'])}, "
            f"qform_code {int(stored['qform_code'])}; a known orientation has a code 1-4): "
            f"which side of the image is left is unknown.", path=dwi_path,
            fix="Set the orientation in the header: re-convert the scan from DICOM (e.g. with "
                "dcm2niix), or write the true affine with `fslorient -setsform ... "
                "-setsformcode 1` or nibabel's img.set_sform(affine, code=1).")

    # the affine next: the voxel size and every world coordinate depend on it
    affine = np.asarray(img.affine, dtype=float)
    header_fix = "Repair the NIfTI header (sform/qform) of the image, or re-export it."
    if not np.all(np.isfinite(affine)):
        raise InputError("The image affine (sform/qform) contains NaN or infinite values.",
                         path=dwi_path, fix=header_fix)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("The image affine (sform/qform) is singular (a zero or repeated axis).",
                         path=dwi_path, fix=header_fix)
    axis_mm = np.linalg.norm(affine[:3, :3], axis=0)
    for sizes, where in ((pixdim, "header (pixdim)"), (axis_mm, "affine")):
        if np.any(sizes < MIN_VOXEL_MM) or np.any(sizes > MAX_VOXEL_MM):
            raise InputError(
                f"Implausible voxel size {np.round(sizes, 4).tolist()} mm in the {where}.",
                path=dwi_path, fix=f"Check the NIfTI header: voxels must be between "
                                   f"{MIN_VOXEL_MM:g} and {MAX_VOXEL_MM:g} mm.")

    warnings = [f"Header fault, repaired by nibabel on reading: {line}." for line in
                img.header_class.diagnose_binaryblock(stored.binaryblock).splitlines()]
    if int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0:
        warnings += _xform_warnings(header)
    if np.max(np.abs(pixdim - axis_mm)) > HEADER_TOL_MM:
        warnings.append(
            f"The voxel size in the header (pixdim: {np.round(pixdim, 4).tolist()} mm) is not "
            f"the affine's ({np.round(axis_mm, 4).tolist()} mm); the affine's is used for "
            f"positions, and the brain-mask volume in the QC uses pixdim.")
    skew_deg = max(abs(a - 90.0) for a in _axis_angles_deg(affine))
    if skew_deg > HEADER_TOL_DEG:
        warnings.append(
            f"The image affine is sheared: its voxel axes are up to {skew_deg:.3g}° from "
            f"perpendicular (tolerated: {HEADER_TOL_DEG:g}°). The b-vectors are turned into "
            f"world directions as if the axes were perpendicular; check the scan's geometry "
            f"(a gantry tilt?) and, if possible, resample it onto a perpendicular grid.")
    if squeeze:  # a lazy 4D view: nothing is read, the header (codes, scaling) is kept
        img = type(img)(img.dataobj.reshape(img.shape[:4]), img.affine, img.header)
    return img, warnings


def load_dwi(dwi_path, bval_path, bvec_path, *, b0_threshold=B0_THRESHOLD, check_data=True,
             memory_limit_bytes=None, n_jobs=1):
    """Load a DWI run and check everything a tensor fit and tracking rely on.

    Parameters
    ----------
    dwi_path, bval_path, bvec_path : path-like
        The 4D NIfTI image and its FSL-format gradient files.
    b0_threshold : float
        b-values at or below this (s/mm²) count as b0 (some vendors store the
        b0 as b=1.25 or b=5).
    check_data : bool
        Also read the voxel data (scaled by the header's ``scl_slope``/``scl_inter``, as
        nibabel and the pipeline read them) to reject unreadable (truncated), non-finite,
        float32-overflowing or all-zero images.
    memory_limit_bytes : int, optional
        Memory the run may use; default: what the machine has available now
        (``MemAvailable``, capped by a cgroup limit).  The estimate (see
        :func:`pipeline.memory.estimated_memory_bytes`, for ``n_jobs`` workers and
        this budget) is checked from the header, before any
        voxel is read, when ``check_data`` is true or a limit is given (the
        pipeline's own reloads, ``check_data=False``, do not repeat it while
        other steps hold memory).
    n_jobs : int
        Workers of the run's steps (for the estimate).

    Returns
    -------
    DwiScan
        With the header's warnings (see :func:`check_header`).

    Raises
    ------
    InputError
        With the offending file and the fix, for any input that cannot be trusted.
    """
    img, header_warnings = check_header(_load_image(dwi_path), dwi_path)
    if min(img.shape[:3]) < 8:
        raise InputError(f"The image grid {img.shape[:3]} is too small for a brain.",
                         path=dwi_path, fix="Pass the whole-brain DWI series.")
    if img.shape[3] < 2:
        raise InputError(f"The diffusion series has {img.shape[3]} volume(s).", path=dwi_path,
                         fix="Pass the whole DWI series (b0 and diffusion-weighted volumes).")
    # Imported here: pipeline.memory imports the stage modules, which import this one.
    from ..memory import estimated_memory_bytes

    available = (memory_limit_bytes if memory_limit_bytes is not None else
                 available_memory_bytes() if check_data else None)
    needed = estimated_memory_bytes(img.shape, input_itemsize=img.get_data_dtype().itemsize,
                                    n_jobs=n_jobs, memory_bytes=available)
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
            # an overflow while scaling is reported below, as the infinite values it leaves
            with np.errstate(over="ignore", invalid="ignore"):
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
            raise InputError("The image contains NaN or infinite values (after any "
                             "scl_slope/scl_inter scaling).", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
        # nibabel scales in float64; the pipeline reads into float32, where larger values
        # would turn infinite (get_fdata warns, nothing stops)
        wide = data.dtype.kind == "f" and data.dtype.itemsize > 4
        peak = float(max(data.max(), -data.min())) if wide else 0.0
        if peak > FLOAT32_MAX:
            raise InputError(
                f"Voxel values reach {peak:.3g} (after any scl_slope/scl_inter scaling), "
                f"beyond the float32 range (±{FLOAT32_MAX:.3g}) the pipeline computes in.",
                path=dwi_path,
                fix="Re-export the image with values in the scanner's range (int16 or float32, "
                    "without an extreme scl_slope).")
        if not np.any(data):
            raise InputError("The image is all zeros.", path=dwi_path,
                             fix="Re-export the image from the scanner data.")
    return DwiScan(img=img, bvals=bvals, bvecs_fsl=bvecs, b0_threshold=float(b0_threshold),
                   n_unique_directions=n_unique, header_warnings=tuple(header_warnings))
