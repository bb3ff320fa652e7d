"""Brain masking, denoising and the diffusion-tensor fit (DIPY).

Gibbs-ringing removal, motion/eddy correction and the gradient-table check
belong between :func:`denoise_dwi` and :func:`fit_dti`; each is its own
function so the workflow can slot them in as nodes.
"""

import numpy as np
from dipy.denoise.localpca import mppca
from dipy.reconst.dti import TensorModel
from dipy.segment.mask import median_otsu

from .parallel import parallel_map

DENOISE_METHODS = ("mppca", "patch2self", "none")


def mean_b0(data, b0_mask):
    """Mean of the b0 volumes (3D float32)."""
    return data[..., b0_mask].mean(axis=-1, dtype=np.float32)


def brain_mask(b0, *, median_radius=2, numpass=1):
    """Brain mask from the mean b0 with DIPY's ``median_otsu`` (bool array)."""
    _, mask = median_otsu(b0, median_radius=median_radius, numpass=numpass)
    return mask.astype(bool)


def mask_bounding_box(mask, margin=2):
    """Slices of the smallest box holding ``mask``, padded by ``margin`` voxels."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
                 for i, n in zip(idx, mask.shape))


def _mppca_slab(slab, slab_mask, patch_radius):
    # Patches without signal divide 0 by 0 inside DIPY; denoise_dwi replaces those NaNs.
    with np.errstate(invalid="ignore", divide="ignore"):
        den, sigma = mppca(slab, mask=slab_mask, patch_radius=patch_radius, return_sigma=True)
    return den.astype(np.float32), sigma.astype(np.float32)


def mppca_slabs(data, mask, *, patch_radius=2, slab_thickness=16, n_jobs=1):
    """MP-PCA over overlapping slabs along the third axis, in parallel with joblib.

    Each slab is padded by ``2 * patch_radius`` slices on both sides, so every
    kept voxel sees exactly the patches a whole-volume run would give it. The
    slab layout does not depend on ``n_jobs``: the result is identical for any
    number of workers.
    """
    pad = 2 * patch_radius
    nz = data.shape[2]
    cores = [(z, min(z + slab_thickness, nz)) for z in range(0, nz, slab_thickness)]
    spans = [(max(a - pad, 0), min(b + pad, nz)) for a, b in cores]
    results = parallel_map(_mppca_slab, [(data[:, :, lo:hi], mask[:, :, lo:hi], patch_radius)
                                         for lo, hi in spans], n_jobs=n_jobs)
    den = np.empty(data.shape, dtype=np.float32)
    sigma = np.empty(data.shape[:3], dtype=np.float32)
    for (a, b), (lo, _), (d, s) in zip(cores, spans, results):
        den[:, :, a:b] = d[:, :, a - lo:b - lo]
        sigma[:, :, a:b] = s[:, :, a - lo:b - lo]
    return den, sigma


def denoise_dwi(data, mask, bvals, *, method="mppca", patch_radius=2, n_jobs=1):
    """Denoise a 4D DWI series inside the brain mask.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    mask : bool ndarray (X, Y, Z)
    bvals : ndarray (N,), s/mm²
    method : {"mppca", "patch2self", "none"}
        MP-PCA (Veraart et al. 2016) or Patch2Self (Fadnavis et al. 2020;
        needs scikit-learn).
    n_jobs : int
        Workers for MP-PCA (the result does not depend on it).

    Returns
    -------
    denoised : float32 ndarray, same shape as ``data``
    noise_sigma : float32 ndarray (X, Y, Z) or None
        The MP-PCA noise standard deviation (signal units); None otherwise.
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"unknown denoising method {method!r}; use one of {DENOISE_METHODS}")
    out = np.array(data, dtype=np.float32, copy=True)
    if method == "none":
        return out, None
    box = mask_bounding_box(mask)
    sub = out[box]
    sigma = None
    if method == "mppca":
        den, sub_sigma = mppca_slabs(sub, mask[box], patch_radius=patch_radius, n_jobs=n_jobs)
        sigma = np.zeros(mask.shape, dtype=np.float32)
        sigma[box] = np.nan_to_num(sub_sigma)
    else:
        from dipy.denoise.patch2self import patch2self
        den = patch2self(sub, bvals, model="ols", shift_intensity=True, clip_negative_vals=False)
    # MP-PCA leaves NaN where a patch has no signal; keep the measured signal there.
    den = np.where(np.isfinite(den), den, sub)
    out[box] = np.where(mask[box][..., None], np.clip(den, 0, None), sub)
    return out, sigma


def fit_dti(data, gtab, mask, *, fit_method="WLS"):
    """Fit the diffusion tensor and return its scalar maps and principal direction.

    Returns
    -------
    dict of ndarray
        ``fa`` (unitless), ``md``, ``rd``, ``ad`` (mm²/s), ``v1`` (X, Y, Z, 3)
        principal eigenvector in the voxel frame of the image.
    """
    fit = TensorModel(gtab, fit_method=fit_method).fit(data, mask=mask)
    maps = {
        "fa": np.clip(np.nan_to_num(fit.fa), 0, 1),
        "md": np.nan_to_num(fit.md),
        "rd": np.nan_to_num(fit.rd),
        "ad": np.nan_to_num(fit.ad),
    }
    maps = {k: np.where(mask, v, 0).astype(np.float32) for k, v in maps.items()}
    maps["v1"] = np.where(mask[..., None], np.nan_to_num(fit.evecs[..., 0]), 0).astype(np.float32)
    return maps
