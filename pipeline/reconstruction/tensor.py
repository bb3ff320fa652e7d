"""b0 reference, brain mask, the volumes a tensor fit may use, and the tensor fit (DIPY).

The artefact-removal steps live in their own modules (``denoise``, ``gibbs``,
``motion``, ``outliers``, ``gradient_check``); the workflow runs them as
separate nodes between :func:`brain_mask` and :func:`fit_dti`.
"""

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.dti import TensorModel
from dipy.segment.mask import median_otsu
from dipy.segment.threshold import otsu
from scipy import ndimage

from .dwi import MIN_DIRECTIONS, count_unique_directions, fsl_bvecs_to_voxel_frame
from .errors import InputError
from .parallel import parallel_map

#: Shells at or below this b-value (s/mm²) feed the tensor; above it the signal is non-Gaussian.
DTI_MAX_BVALUE = 1500.0
#: b-values within this many s/mm² of each other belong to one shell (vendors round differently).
SHELL_TOLERANCE = 50.0
#: Tissue signal: the mean b0 above this fraction of its Otsu threshold (background ~1 %
#: of it; sub-siemens03's dark pons ~75 %).
SIGNAL_FRACTION_OF_OTSU = 0.25
#: How far (mm) from the Otsu mask the template's brain may add voxels.
TEMPLATE_REACH_MM = 15.0


def mean_b0(data, b0_mask):
    """Mean of the b0 volumes (3D float32)."""
    return data[..., b0_mask].mean(axis=-1, dtype=np.float32)


def mean_dwi(data, b0_mask):
    """Mean of the diffusion-weighted volumes (3D float32)."""
    return data[..., ~b0_mask].mean(axis=-1, dtype=np.float32)


def axial_axis(affine):
    """The voxel axis closest to world superior-inferior (z) in ``affine``."""
    directions = np.asarray(affine)[:3, :3] / np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def fill_holes(mask, affine):
    """Fill the holes of a mask in 3D, then in every axial slice.

    A hole closed only within the axial plane (a dark brainstem ringed by the
    temporal lobes and cerebellum, its lower end open at the edge of the field
    of view) is not a 3D hole, so the slice-wise pass is needed too.
    """
    filled = ndimage.binary_fill_holes(mask)
    axis = axial_axis(affine)
    for k in range(filled.shape[axis]):
        index = [slice(None)] * 3
        index[axis] = k
        filled[tuple(index)] = ndimage.binary_fill_holes(filled[tuple(index)])
    return filled


def signal_region(b0):
    """Voxels with tissue signal: the median-filtered mean b0 above a quarter of its Otsu
    threshold, holes filled (air and bone stay out; dark brain tissue does not)."""
    smooth = ndimage.median_filter(np.asarray(b0, dtype=np.float32), size=3)
    return ndimage.binary_fill_holes(smooth > SIGNAL_FRACTION_OF_OTSU * otsu(smooth))


def brain_mask(b0, dwi_mean=None, affine=None, *, template_brain=None,
               median_radius=2, numpass=1):
    """Brain mask that keeps the brainstem (bool array).

    DIPY's ``median_otsu`` on the mean b0, united with ``median_otsu`` on the mean
    diffusion-weighted image when given, holes filled (:func:`fill_holes`). On the
    b0 the brainstem can be as dark as the CSF and bone around it (T2 contrast,
    flow and susceptibility artefacts), and Otsu cuts it out, silently removing the
    lower CST; on the DW image white matter is bright and CSF dark, so the two
    fail in different places. Where both fail (sub-siemens03, b=2500: its midbrain
    and pons dark in both), ``template_brain`` (the template's brain mask on this
    grid, :func:`pipeline.registration.template_mask_in_subject`) adds the voxels
    it calls brain that have tissue signal (:func:`signal_region`) and lie within
    :data:`TEMPLATE_REACH_MM` of the Otsu mask, so a misregistered template cannot
    add more than a rim. ``affine`` defaults to the identity.
    """
    if affine is None:
        affine = np.eye(4)
    _, mask = median_otsu(b0, median_radius=median_radius, numpass=numpass)
    if dwi_mean is not None:
        mask |= median_otsu(dwi_mean, median_radius=median_radius, numpass=numpass)[1]
    mask = fill_holes(mask.astype(bool), affine)
    if template_brain is not None:
        distance = ndimage.distance_transform_edt(
            ~mask, sampling=np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
        mask |= template_brain & signal_region(b0) & (distance <= TEMPLATE_REACH_MM)
        mask = fill_holes(mask, affine)
    return mask


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
