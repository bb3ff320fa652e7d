"""The volumes a tensor fit may use, and the tensor fit (DIPY).

The artefact-removal steps (:mod:`pipeline.preprocessing`) run before it, as
separate nodes between :func:`pipeline.preprocessing.mask.brain_mask` and :func:`fit_dti`.
"""

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.dti import TensorModel

from ..errors import InputError
from ..io.dwi import MIN_DIRECTIONS, count_unique_directions, fsl_bvecs_to_voxel_frame
from ..parallel import parallel_map

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


def _fit_tensor_slab(model, data, mask):
    """Tensor maps of one slab: FA, MD, RD, AD and the principal eigenvector."""
    fit = model.fit(data, mask=mask)
    return fit.fa, fit.md, fit.rd, fit.ad, fit.evecs[..., 0]


def fit_dti(data, bvals, bvecs_fsl, affine, mask, *, b0_threshold, use=None, fit_method="WLS",
            n_jobs=1):
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
        Threads, each fitting a slab of slices with about the same number of brain
        voxels (DIPY's fit is voxel by voxel and its batched SVDs release the GIL;
        the maps do not depend on ``n_jobs``).

    Returns
    -------
    dict of ndarray
        ``fa`` (unitless), ``md``, ``rd``, ``ad`` (mm²/s), ``v1`` (X, Y, Z, 3)
        principal eigenvector in the voxel frame of the image.
    """
    use = np.ones(len(bvals), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    gtab = gradient_table(np.asarray(bvals)[use],
                          bvecs=fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl)[use], affine),
                          b0_threshold=b0_threshold)
    model = TensorModel(gtab, fit_method=fit_method)
    mask = np.asarray(mask, dtype=bool)
    # Slab boundaries at equal shares of the brain voxels, counted slice by slice.
    voxels_before = np.concatenate([[0], np.cumsum(mask.sum(axis=(0, 1)))])
    bounds = np.unique(np.searchsorted(voxels_before, np.linspace(0, voxels_before[-1],
                                                                  n_jobs + 1)[1:-1]))
    bounds = bounds[(bounds > 0) & (bounds < mask.shape[2])]  # no empty slab
    slabs = [slice(int(a), int(b))
             for a, b in zip(np.r_[0, bounds], np.r_[bounds, mask.shape[2]])]
    fitted = parallel_map(_fit_tensor_slab, [(model, data[:, :, z][..., use], mask[:, :, z])
                                             for z in slabs], n_jobs=n_jobs, threads=True)
    fa, md, rd, ad, v1 = (np.concatenate(parts, axis=2) for parts in zip(*fitted))
    maps = {"fa": np.clip(np.nan_to_num(fa), 0, 1), "md": np.nan_to_num(md),
            "rd": np.nan_to_num(rd), "ad": np.nan_to_num(ad)}
    maps = {k: np.where(mask, v, 0).astype(np.float32) for k, v in maps.items()}
    maps["v1"] = np.where(mask[..., None], np.nan_to_num(v1), 0).astype(np.float32)
    return maps
