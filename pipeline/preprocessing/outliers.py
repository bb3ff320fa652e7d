"""Outlier volumes of a DWI series: slice signal dropout and extreme head motion.

Signal dropout: bulk motion during the diffusion encoding dephases the spins of
the slices being acquired, so those slices of a diffusion-weighted volume come
out much darker than the same slices of the other volumes of its shell (with an
interleaved acquisition, every other slice). b0 volumes have no diffusion
encoding and are not checked for it.

Slices are along the third voxel axis (the acquisition axis of the scans seen
here, axial or sagittal). Pass the series before motion correction: its slices
are the acquired ones. Resampling mixes neighbouring slices, and leaves an end
slice empty in volumes whose head moved along the slice axis (sub-philips01 after
correction: slice 59 of volumes 25-31 would count as dropped).
"""

import numpy as np
from scipy.spatial.transform import Rotation

from ..io.dwi import B0_THRESHOLD
from .motion import framewise_displacement

#: A slice is a dropout when its in-mask mean signal is below this fraction of
#: the shell's median for that slice (a dropout loses most of the signal of the
#: slice: 7% was left in the one found in these scans)...
DROPOUT_RATIO = 0.7
#: ...and its robust z-score (median and MAD over the shell's volumes) is below
#: this. Both are needed: head motion changes the brain coverage of the end
#: slices in many volumes at once (sub-philips01: ratios down to 0.52, but with
#: z > -3.9 because the shell varies as much there), and some slices are so
#: consistent that a 15% anisotropy difference reaches z = -8 (sub-toshiba01).
DROPOUT_ROBUST_Z = -5.0
#: Slices with fewer mask voxels are not judged (their mean is noise).
MIN_SLICE_VOXELS = 50
#: Fewest volumes a shell needs for a robust median and MAD of each slice.
MIN_SHELL_VOLUMES = 4
#: b-values (s/mm²) closer than this belong to one shell (scanners vary the
#: nominal b by a few percent between directions).
SHELL_TOLERANCE = 100.0
#: Framewise displacement (Power et al. 2012, mm) beyond which a volume is
#: excluded: registration undoes motion between volumes, but a jump of two
#: voxels or more (typical DWI voxels are 2-2.5 mm) within the ~5-10 s between
#: two volumes makes motion during the volume's own acquisition likely, which no
#: registration corrects. In the scans here a slow drift reached 4.4 mm
#: (sub-philips01, kept); sub-siemens02 jumps ~3.5 mm back and forth between
#: volumes (confirmed by volume-to-volume registration; 5.7-8.4 mm, excluded).
MAX_FRAMEWISE_DISPLACEMENT_MM = 5.0
#: Rotation from the reference (degrees) beyond which a volume is excluded: the
#: slices then cut the head at a clearly different angle, so resampling to the
#: reference mixes distant slices (2.5-4 mm thick) and the spin history differs.
MAX_ROTATION_DEG = 5.0


def detect_outlier_volumes(data, bvals, mask, *, b0_threshold=B0_THRESHOLD, motion_parameters=None,
                           dropout_ratio=DROPOUT_RATIO, dropout_robust_z=DROPOUT_ROBUST_Z,
                           max_framewise_displacement_mm=MAX_FRAMEWISE_DISPLACEMENT_MM,
                           max_rotation_deg=MAX_ROTATION_DEG):
    """Volumes to leave out of the model fit, with the reason for each.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
        The DWI series (signal units), slices along the third axis.
    bvals : ndarray (N,)
        b-values, s/mm².
    mask : bool ndarray (X, Y, Z)
        Brain (or head) mask; slice means are taken inside it.
    b0_threshold : float
        b-values at or below this (s/mm²) are b0s.
    motion_parameters : ndarray (N, 6), optional
        Translations (mm) and rotations (degrees, extrinsic x, y, z), as
        :attr:`pipeline.preprocessing.motion.MotionCorrection.parameters`; without them only
        dropout is checked.
    dropout_ratio, dropout_robust_z : float
        Dropout thresholds (see :data:`DROPOUT_RATIO`, :data:`DROPOUT_ROBUST_Z`).
    max_framewise_displacement_mm, max_rotation_deg : float
        Motion thresholds (see the module constants).

    Returns
    -------
    dict
        ``volumes``: sorted indices to exclude; ``reasons``: {index: text}, also
        for a b0 that met a criterion but was kept because no other b0 would
        be left (the reference and the tensor fit need one);
        ``slice_dropout``: sorted [volume, slice] pairs; ``thresholds``: the
        values used.
    """
    bvals = np.asarray(bvals, dtype=float)
    problems = {}
    dropout = slice_dropout(data, bvals, mask, b0_threshold=b0_threshold, ratio=dropout_ratio,
                            robust_z=dropout_robust_z)
    for volume in sorted({v for v, _ in dropout}):
        slices = [s for v, s in dropout if v == volume]
        problems.setdefault(volume, []).append(
            f"signal dropout in slice{'s' if len(slices) > 1 else ''} "
            f"{', '.join(map(str, slices))}")
    fd = None
    if motion_parameters is not None:
        motion_parameters = np.asarray(motion_parameters, dtype=float)
        fd = framewise_displacement(motion_parameters)
        angles = np.rad2deg(Rotation.from_euler("xyz", motion_parameters[:, 3:],
                                                degrees=True).magnitude())
        for volume in np.flatnonzero(fd > max_framewise_displacement_mm):
            problems.setdefault(int(volume), []).append(
                f"framewise displacement {fd[volume]:.1f} mm "
                f"> {max_framewise_displacement_mm:g} mm")
        for volume in np.flatnonzero(angles > max_rotation_deg):
            problems.setdefault(int(volume), []).append(
                f"rotated {angles[volume]:.1f}° from the reference > {max_rotation_deg:g}°")

    reasons = {volume: "; ".join(texts) for volume, texts in sorted(problems.items())}
    excluded = set(reasons)
    b0s = np.flatnonzero(bvals <= b0_threshold)
    if b0s.size and excluded.issuperset(b0s.tolist()):
        # Only the motion rules reach b0s: keep the one that moved least.
        kept = int(b0s[np.argmin(fd[b0s])])
        excluded.discard(kept)
        reasons[kept] = (f"kept although {reasons[kept]}: it is the only b0 left, and the "
                         "reference and the tensor fit need one")
    return {
        "volumes": sorted(excluded),
        "reasons": reasons,
        "slice_dropout": dropout,
        "thresholds": {
            "b0_threshold": float(b0_threshold),
            "dropout_ratio": float(dropout_ratio),
            "dropout_robust_z": float(dropout_robust_z),
            "min_slice_voxels": MIN_SLICE_VOXELS,
            "min_shell_volumes": MIN_SHELL_VOLUMES,
            "shell_tolerance": SHELL_TOLERANCE,
            "max_framewise_displacement_mm": float(max_framewise_displacement_mm),
            "max_rotation_deg": float(max_rotation_deg),
        },
    }


def slice_dropout(data, bvals, mask, *, b0_threshold=B0_THRESHOLD, ratio=DROPOUT_RATIO,
                  robust_z=DROPOUT_ROBUST_Z):
    """Slices of diffusion-weighted volumes whose signal dropped out.

    For every shell with at least :data:`MIN_SHELL_VOLUMES` volumes and every
    slice (third voxel axis) with at least :data:`MIN_SLICE_VOXELS` mask
    voxels, a volume's in-mask mean signal is compared with the median over the
    shell: a dropout is below ``ratio`` times the median and below ``robust_z``
    in robust z-score (MAD scaled by 1.4826 to a standard deviation).

    Returns
    -------
    list of [int, int]
        Sorted [volume, slice] pairs.
    """
    bvals = np.asarray(bvals, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    means = slice_means(data, mask)
    judged = mask.sum(axis=(0, 1)) >= MIN_SLICE_VOXELS
    found = []
    for shell in diffusion_shells(bvals, b0_threshold=b0_threshold):
        if shell.size < MIN_SHELL_VOLUMES:
            continue
        values = means[:, shell]
        median = np.median(values, axis=1, keepdims=True)
        spread = 1.4826 * np.median(np.abs(values - median), axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            low = (values < ratio * median) & ((values - median) < robust_z * spread)
        low &= (judged & (median[:, 0] > 0))[:, None]
        found += [[int(shell[j]), int(s)] for s, j in zip(*np.nonzero(low))]
    return sorted(found)


def slice_means(data, mask):
    """In-mask mean signal of every slice (third axis) of every volume: (Z, N) float64.

    Slices without mask voxels get 0.
    """
    counts = mask.sum(axis=(0, 1))
    sums = np.stack([np.where(mask, data[..., n], 0).sum(axis=(0, 1), dtype=np.float64)
                     for n in range(data.shape[-1])], axis=1)
    return sums / np.maximum(counts, 1)[:, None]


def diffusion_shells(bvals, *, b0_threshold=B0_THRESHOLD, tolerance=SHELL_TOLERANCE):
    """Indices of the diffusion-weighted volumes of each shell (b-values within ``tolerance``).

    Returns
    -------
    list of int ndarray
        One array per shell, by increasing b-value.
    """
    bvals = np.asarray(bvals, dtype=float)
    weighted = np.flatnonzero(bvals > b0_threshold)
    order = weighted[np.argsort(bvals[weighted], kind="stable")]
    shells = []
    for index in order:
        if shells and bvals[index] - bvals[shells[-1][-1]] <= tolerance:
            shells[-1].append(index)
        else:
            shells.append([index])
    return [np.sort(np.array(shell)) for shell in shells]
