"""The volumes a tensor fit may use, and the tensor fit (DIPY).

The artefact-removal steps (:mod:`pipeline.preprocessing`) run before it, as
separate nodes between :func:`pipeline.preprocessing.mask.brain_mask` and :func:`fit_dti`.
"""

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.dti import TensorModel

from ..errors import InputError
from ..io.dwi import MIN_DIRECTIONS, count_unique_directions, fsl_bvecs_to_voxel_frame
from ..parallel import parallel_imap_threads

#: Shells at or below this b-value (s/mm²) feed the tensor; above it the signal is non-Gaussian.
DTI_MAX_BVALUE = 1500.0
#: b-values within this many s/mm² of each other belong to one shell (vendors round differently).
SHELL_TOLERANCE = 50.0
def dti_volumes(bvals, *, b0_threshold, max_bvalue=DTI_MAX_BVALUE, excluded=()):
    """Which volumes the tensor fit uses, and the diffusion shells they come from.

    b0 volumes and every shell at or below ``max_bvalue`` (s/mm²); a scan
    whose lowest shell lies above it (e.g. b=2500 only) uses that lowest shell.
    Volumes listed in ``excluded`` (outliers) are left out.

    Returns
    -------
    use : bool ndarray (N,)
    shells : list of float
        Nominal b-values (s/mm²) of the diffusion shells used.
    """
    bvals = np.asarray(bvals, dtype=float)
    weighted = bvals > b0_threshold
    shells = unique_bvals_tolerance(bvals[weighted], tol=SHELL_TOLERANCE)
    chosen = [float(b) for b in shells if b <= max_bvalue + SHELL_TOLERANCE] or [float(shells[0])]
    in_chosen = np.any(np.abs(bvals[:, None] - np.asarray(chosen)[None, :]) <= SHELL_TOLERANCE,
                       axis=1)
    use = ~weighted | (weighted & in_chosen)
    use[list(excluded)] = False
    return use, chosen


def check_tensor_directions(bvals, bvecs, use, *, b0_threshold, path, n_excluded):
    """Refuse a tensor fit from fewer than 6 distinct directions or without a b0."""
    if not np.any(use & (bvals <= b0_threshold)):
        raise InputError("No usable b0 volume remains for the tensor fit.", path=path,
                         fix="Check the b0 volume(s) of the scan; raise --b0-threshold if the "
                             "b0 is stored with a small b-value.")
    n_dirs = count_unique_directions(bvecs[use], bvals[use], b0_threshold)
    if n_dirs < MIN_DIRECTIONS:
        raise InputError(
            f"Only {n_dirs} distinct diffusion directions remain for the tensor fit "
            f"({n_excluded} outlier volume(s) excluded); it needs {MIN_DIRECTIONS}.", path=path,
            fix="Keep the outlier volumes (--outliers report), or re-acquire the scan.")


#: Brain voxels DIPY fits at once (``TensorModel``'s ``step``, its default).
TENSOR_FIT_STEP = 10_000
#: Voxels per work unit of :func:`fit_dti` when no memory budget is given (~0.2 GB at 33
#: volumes).
TENSOR_CHUNK_VOXELS = 200_000


def tensor_bytes_per_voxel(n_volumes):
    """Working memory (bytes) per brain voxel of a :func:`fit_dti` work unit of
    ``n_volumes`` fitted volumes: its float32 signal (4 per volume) and, measured with
    tracemalloc at 13–105 volumes, DIPY's floored copy, the fitted parameters (12 float64)
    and the maps derived from them (4 per volume + 143)."""
    return 8 * int(n_volumes) + 144


#: Working memory of one step of DIPY's tensor fit per voxel (bytes): ``a`` per volume
#: plus ``b``, for ``(a, b)`` by fit method. WLS (its float64 weighted design matrices):
#: 240 per volume + 560 measured with tracemalloc at 13, 33, 40 and 105 volumes, rounded
#: up; OLS: about 10 per volume.
TENSOR_STEP_BYTES = {"WLS": (248, 600), "OLS": (16, 600)}


def tensor_step_bytes(n_volumes, n_voxels=TENSOR_FIT_STEP, fit_method="WLS"):
    """Working memory (bytes) of one DIPY fitting step of ``n_voxels`` voxels (at most
    :data:`TENSOR_FIT_STEP`; :data:`TENSOR_STEP_BYTES`)."""
    per_volume, per_voxel = TENSOR_STEP_BYTES[fit_method]
    return min(int(n_voxels), TENSOR_FIT_STEP) * (per_volume * int(n_volumes) + per_voxel)


def tensor_chunk_voxels(n_volumes, *, fit_method="WLS", n_workers=1, memory_bytes=None):
    """Brain voxels per :func:`fit_dti` work unit that fit a memory budget (the maps do not
    depend on it: DIPY fits voxel by voxel).

    Parameters
    ----------
    n_volumes : int
        Volumes fitted.
    fit_method : {"WLS", "OLS"}
    n_workers : int
        Work units fitted at the same time; each gets an equal share of the budget.
    memory_bytes : int, optional
        Memory all workers together may use beyond the series and the output maps. None:
        :data:`TENSOR_CHUNK_VOXELS`.

    Returns
    -------
    int
        At most :data:`TENSOR_CHUNK_VOXELS` and at least :data:`TENSOR_FIT_STEP` (so a
        budget below one step is exceeded, not refused).
    """
    if memory_bytes is None:
        return TENSOR_CHUNK_VOXELS
    share = memory_bytes / max(int(n_workers), 1) - tensor_step_bytes(
        n_volumes, fit_method=fit_method)
    fitting = int(share // tensor_bytes_per_voxel(n_volumes))
    return int(np.clip(fitting, TENSOR_FIT_STEP, TENSOR_CHUNK_VOXELS))


def tensor_work_units(n_brain_voxels, n_volumes, *, fit_method="WLS", n_workers=1,
                      memory_bytes=None):
    """Boundaries (indices into the brain voxels, ascending) of :func:`fit_dti`'s work
    units: as many equal units as :func:`tensor_chunk_voxels` needs, and at least one per
    worker."""
    chunk = tensor_chunk_voxels(n_volumes, fit_method=fit_method, n_workers=n_workers,
                                memory_bytes=memory_bytes)
    n_brain_voxels = int(n_brain_voxels)
    n_units = max(-(-n_brain_voxels // chunk), min(int(n_workers), n_brain_voxels), 1)
    return np.linspace(0, n_brain_voxels, n_units + 1).astype(int)


def tensor_working_bytes(n_brain_voxels, n_volumes, *, fit_method="WLS", n_workers=1,
                         memory_bytes=None):
    """Working memory (bytes) of :func:`fit_dti` beyond the series and its float32 output
    maps (7 per voxel): the brain voxels' indices (3 int64 each) and the largest work
    unit (:func:`tensor_work_units`) with its DIPY step on each worker (several workers
    are handed a second unit's signal each)."""
    bounds = tensor_work_units(n_brain_voxels, n_volumes, fit_method=fit_method,
                               n_workers=n_workers, memory_bytes=memory_bytes)
    unit = int(np.diff(bounds).max(initial=0))
    busy = min(max(int(n_workers), 1), len(bounds) - 1)
    waiting = 0 if busy == 1 else busy * unit * 4 * int(n_volumes)
    return (3 * 8 * int(n_brain_voxels) + waiting
            + busy * (unit * tensor_bytes_per_voxel(n_volumes)
                      + tensor_step_bytes(n_volumes, unit, fit_method)))


def _fit_tensor_voxels(model, signal):
    """Tensor maps of brain voxels (``signal``: (V, N)), float32: FA (clipped to [0, 1]),
    MD, RD, AD and the principal eigenvector; 0 where the fit gives no number."""
    fit = model.fit(signal)
    maps = [np.clip(np.nan_to_num(fit.fa), 0, 1)] + [np.nan_to_num(m) for m in
                                                    (fit.md, fit.rd, fit.ad, fit.evecs[..., 0])]
    return [m.astype(np.float32) for m in maps]


def fit_dti(data, bvals, bvecs_fsl, affine, mask, *, b0_threshold, use=None, fit_method="WLS",
            n_jobs=1, memory_bytes=None):
    """Fit the diffusion tensor and return its scalar maps and principal direction.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    bvals : ndarray (N,), s/mm²
    bvecs_fsl : ndarray (N, 3), FSL/BIDS convention
    affine : ndarray (4, 4)
    mask : bool ndarray (X, Y, Z)
    b0_threshold : float, s/mm²
    use : bool ndarray (N,), optional
        Volumes to fit (see :func:`dti_volumes`); default all.
    n_jobs : int
        Threads, each fitting a work unit of brain voxels (DIPY's fit is voxel by voxel and
        its batched SVDs release the GIL; the maps do not depend on ``n_jobs``).
    memory_bytes : int, optional
        Working-memory budget of the fit, which sizes its work units
        (:func:`tensor_chunk_voxels`; the maps do not depend on it).

    Returns
    -------
    dict of ndarray
        ``fa`` (unitless), ``md``, ``rd``, ``ad`` (mm²/s), ``v1`` (X, Y, Z, 3)
        principal eigenvector in the voxel frame of the image; float32, 0 outside the mask.

    Notes
    -----
    Each work unit copies out only its own brain voxels' signal (the volumes in
    ``use``), when a worker asks for it, and its float32 maps are written into the
    output as it finishes: beyond the series and the maps, at most ``n_jobs`` units are
    in memory (:func:`tensor_working_bytes`).
    """
    use = np.ones(len(bvals), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    gtab = gradient_table(np.asarray(bvals)[use],
                          bvecs=fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl)[use], affine),
                          b0_threshold=b0_threshold)
    model = TensorModel(gtab, fit_method=fit_method, step=TENSOR_FIT_STEP)
    mask = np.asarray(mask, dtype=bool)
    brain = np.nonzero(mask)
    volumes = np.flatnonzero(use)
    bounds = tensor_work_units(len(brain[0]), len(volumes), fit_method=fit_method,
                               n_workers=n_jobs, memory_bytes=memory_bytes)
    units = [tuple(axis[a:b] for axis in brain) for a, b in zip(bounds[:-1], bounds[1:])]
    signals = ((model, data[i[:, None], j[:, None], k[:, None], volumes])
               for i, j, k in units)
    maps = {name: np.zeros(mask.shape, dtype=np.float32) for name in ("fa", "md", "rd", "ad")}
    maps["v1"] = np.zeros(mask.shape + (3,), dtype=np.float32)
    for voxels, fitted in zip(units, parallel_imap_threads(_fit_tensor_voxels, signals,
                                                           n_jobs=n_jobs)):
        for name, values in zip(("fa", "md", "rd", "ad", "v1"), fitted):
            maps[name][voxels] = values
    return maps
