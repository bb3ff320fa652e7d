"""Outlier volumes: slice-wise signal dropout and extreme motion.

A dropped slice (bulk motion during the diffusion encoding, spikes, failed
shim) shows as a slice whose mean signal inside the brain falls far below what
the other volumes of the same shell show for that slice. The slice axis is the
third voxel axis (the acquisition axis of dcm2niix-converted data).
"""

import numpy as np
from dipy.core.gradients import unique_bvals_tolerance

#: A slice is dropped when its brain mean is below this fraction of the shell's median ...
DROPOUT_RATIO = 0.7
#: ... and this many robust standard deviations below it (healthy direction-to-direction
#: variation of a slice mean is a few percent; oriented brainstem slices reach ~15 %).
DROPOUT_ROBUST_Z = 4.0
#: Slices with fewer brain voxels than this are too small to judge.
MIN_SLICE_VOXELS = 30
#: Framewise displacement (mm) beyond which a volume counts as extreme motion.
MAX_FRAMEWISE_DISPLACEMENT_MM = 3.0
#: b-values (s/mm²) within this distance form one shell.
SHELL_TOLERANCE = 50.0


def slice_means(data, mask):
    """Mean signal of each slice (third axis) inside the mask, per volume: (Z, N); NaN if small."""
    counts = mask.sum(axis=(0, 1))
    sums = np.einsum("xyzn,xyz->zn", data, mask.astype(data.dtype))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts < MIN_SLICE_VOXELS] = np.nan
    return means


def dropped_slices(data, bvals, mask, *, b0_threshold=50.0):
    """(volume, slice) pairs whose brain signal drops out relative to the volume's shell.

    Shells with fewer than 3 volumes (e.g. a single b0) cannot be judged and are skipped.
    """
    means = slice_means(np.asarray(data, dtype=np.float32), mask)
    bvals = np.asarray(bvals, dtype=float)
    shells = [bvals <= b0_threshold]
    weighted = bvals > b0_threshold
    for b in unique_bvals_tolerance(bvals[weighted], tol=SHELL_TOLERANCE):
        shells.append(weighted & (np.abs(bvals - b) <= SHELL_TOLERANCE))
    found = []
    for members in shells:
        if members.sum() < 3:
            continue
        shell = means[:, members]
        median = np.median(shell, axis=1, keepdims=True)
        spread = 1.4826 * np.median(np.abs(shell - median), axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            low = (shell < DROPOUT_RATIO * median) & \
                  (shell < median - DROPOUT_ROBUST_Z * np.maximum(spread, 1e-6 * median))
        for z, k in zip(*np.nonzero(low)):
            found.append((int(np.flatnonzero(members)[k]), int(z)))
    return sorted(found)


def framewise_displacement(motion_parameters, radius_mm=50.0):
    """Power et al. 2012 framewise displacement (mm) from (N, 6) translation mm / rotation deg."""
    params = np.asarray(motion_parameters, dtype=float)
    steps = np.abs(np.diff(params, axis=0))
    fd = steps[:, :3].sum(axis=1) + radius_mm * np.radians(steps[:, 3:]).sum(axis=1)
    return np.concatenate([[0.0], fd])


def detect_outlier_volumes(data, bvals, mask, *, b0_threshold=50.0, motion_parameters=None):
    """Volumes to leave out of the fit: signal dropout in a slice, or extreme motion.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    bvals : ndarray (N,), s/mm²
    mask : bool ndarray (X, Y, Z)
    motion_parameters : ndarray (N, 6), optional
        Translation (mm) and rotation (degrees) of each volume.

    Returns
    -------
    dict
        ``volumes`` (sorted indices), ``reasons`` (index → text), ``slice_dropout``
        ([volume, slice] pairs) and ``thresholds``. The only b0 volume is never
        flagged: the fit cannot do without it.
    """
    bvals = np.asarray(bvals, dtype=float)
    reasons = {}
    dropout = dropped_slices(data, bvals, mask, b0_threshold=b0_threshold)
    for volume in sorted({v for v, _ in dropout}):
        slices = [z for v, z in dropout if v == volume]
        reasons[volume] = f"signal dropout in {len(slices)} slice(s) ({', '.join(map(str, slices))})"
    if motion_parameters is not None:
        fd = framewise_displacement(motion_parameters)
        for volume in np.flatnonzero(fd > MAX_FRAMEWISE_DISPLACEMENT_MM):
            text = f"framewise displacement {fd[volume]:.1f} mm"
            reasons[int(volume)] = f"{reasons[volume]}; {text}" if volume in reasons else text
    b0 = np.flatnonzero(bvals <= b0_threshold)
    if len(b0) and set(b0) <= set(reasons):
        keep = int(b0[0])
        reasons[keep] += " (kept: the only usable b0)"
    flagged = sorted(v for v, text in reasons.items() if not text.endswith("usable b0)"))
    return {"volumes": flagged, "reasons": reasons,
            "slice_dropout": [[v, z] for v, z in dropout],
            "thresholds": {"dropout_ratio": DROPOUT_RATIO, "dropout_robust_z": DROPOUT_ROBUST_Z,
                           "min_slice_voxels": MIN_SLICE_VOXELS,
                           "max_framewise_displacement_mm": MAX_FRAMEWISE_DISPLACEMENT_MM}}
