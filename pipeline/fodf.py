"""Fibre orientation distributions by constrained spherical deconvolution (DIPY's CSD),
and the choice between them and the tensor that the acquisition allows.

The tensor has one direction per voxel, so deterministic tensor tracking stops or
turns where the CST crosses the callosal and association fibres of the corona
radiata. CSD resolves those crossings, but needs enough directions on one shell
for its spherical-harmonic order: 15 coefficients at order 4, 28 at 6, 45 at 8.
"""

import warnings

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, response_from_mask_ssst
from dipy.reconst.shm import convert_sh_from_legacy

from .dwi import count_unique_directions, fsl_bvecs_to_voxel_frame
from .parallel import parallel_map

#: (distinct directions on the shell, spherical-harmonic order): the highest order whose
#: coefficients the directions outnumber. Fewer than the last entry: tensor only.
SH_ORDER_BY_DIRECTIONS = ((45, 8), (28, 6), (16, 4))
#: FA of the single-fibre voxels whose signal gives the response function.
RESPONSE_FA = 0.7
#: Fewest single-fibre voxels for a response estimate; below it, the most anisotropic
#: voxels of the brain are used instead.
MIN_RESPONSE_VOXELS = 100
#: Voxels per CSD fitting chunk (the chunks are spread over the workers).
FIT_CHUNK_VOXELS = 4000
#: Spherical-harmonic basis of the coefficients: Descoteaux 2007 in DIPY's current,
#: non-legacy form (DIPY's CSD fits in the legacy form, which DIPY is retiring).
SH_BASIS = "descoteaux07"


def csd_shell(bvals, bvecs_fsl, b0_threshold):
    """The shell CSD uses: b-value (s/mm²) and its number of distinct directions.

    The shell with the most distinct directions (ties: the higher b-value).
    """
    bvals = np.asarray(bvals, dtype=float)
    shells = np.unique(np.round(bvals[bvals > b0_threshold], -2))
    best = (0.0, 0)
    for shell in shells:
        on_shell = np.abs(bvals - shell) <= 100
        n_dirs = count_unique_directions(np.asarray(bvecs_fsl)[on_shell], bvals[on_shell],
                                         b0_threshold)
        if (n_dirs, shell) > (best[1], best[0]):
            best = (float(shell), n_dirs)
    return best


def sh_order_for(n_directions):
    """Spherical-harmonic order CSD can use with ``n_directions`` (None: tensor only)."""
    for needed, order in SH_ORDER_BY_DIRECTIONS:
        if n_directions >= needed:
            return order
    return None


def choose_model(bvals, bvecs_fsl, b0_threshold, requested="auto"):
    """Tracking model for this acquisition.

    Parameters
    ----------
    requested : {"auto", "dti", "csd"}
        ``auto``: CSD when the best shell's directions allow an order ≥ 4, else the
        tensor. ``csd`` on too few directions is refused by the caller.

    Returns
    -------
    dict: ``model`` ("dti" or "csd"), ``shell_bvalue``, ``n_directions``, ``sh_order``
    (None for "dti") and ``reason`` (one sentence for the report).
    """
    shell, n_dirs = csd_shell(bvals, bvecs_fsl, b0_threshold)
    order = sh_order_for(n_dirs)
    if requested == "dti" or (requested == "auto" and order is None):
        why = ("tensor asked for" if requested == "dti" else
               f"{n_dirs} directions on the b={shell:g} shell are too few for CSD "
               f"(order 4 needs {SH_ORDER_BY_DIRECTIONS[-1][0]})")
        return {"model": "dti", "shell_bvalue": shell, "n_directions": n_dirs,
                "sh_order": None, "reason": why}
    return {"model": "csd", "shell_bvalue": shell, "n_directions": n_dirs, "sh_order": order,
            "reason": f"{n_dirs} directions on the b={shell:g} shell allow CSD of order {order}"}


def _shell_volumes(bvals, b0_threshold, shell):
    bvals = np.asarray(bvals, dtype=float)
    return (bvals <= b0_threshold) | (np.abs(bvals - shell) <= 100)


def response_mask(fa, mask):
    """Single-fibre voxels for the response: FA ≥ :data:`RESPONSE_FA` in the brain,
    or the :data:`MIN_RESPONSE_VOXELS` most anisotropic brain voxels when fewer qualify
    (low-resolution scans, where partial volume keeps FA lower)."""
    mask = np.asarray(mask, dtype=bool)
    chosen = mask & (fa >= RESPONSE_FA)
    if chosen.sum() < MIN_RESPONSE_VOXELS:
        values = np.where(mask, fa, -1.0)
        cut = np.sort(values, axis=None)[-MIN_RESPONSE_VOXELS]
        chosen = mask & (values >= cut)
    return chosen


def _fit_chunk(signals, gtab, response, sh_order):
    with warnings.catch_warnings():  # DIPY's CSD fits in the legacy basis; converted below
        warnings.filterwarnings("ignore", message="The legacy descoteaux07",
                                category=PendingDeprecationWarning)
        # noisy voxels (e.g. outside the white matter) that reach the iteration limit keep
        # their last estimate; a warning per voxel would say nothing more
        warnings.filterwarnings("ignore", message="maximum number of iterations exceeded")
        model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=sh_order)
        legacy = model.fit(signals).shm_coeff
    return convert_sh_from_legacy(legacy, SH_BASIS).astype(np.float32)


def fit_csd(data, bvals, bvecs_fsl, affine, mask, fa, *, b0_threshold, shell, sh_order,
            fit_mask=None, n_jobs=1):
    """Fibre ODFs by single-shell constrained spherical deconvolution.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    bvals : (N,) s/mm² ; bvecs_fsl : (N, 3), FSL/BIDS convention
    affine : (4, 4) ; mask : bool (X, Y, Z), brain ; fa : (X, Y, Z), for the response
    b0_threshold, shell : s/mm², the b0 limit and the shell used (:func:`csd_shell`)
    sh_order : int, even
    fit_mask : bool (X, Y, Z), optional
        Voxels to fit (default ``mask``); tracking only needs the white matter.
    n_jobs : int
        Workers; the voxel chunks are fixed, so the result does not depend on it.

    Returns
    -------
    sh : float32 (X, Y, Z, n_coefficients), voxel frame, :data:`SH_BASIS` (non-legacy)
    info : dict, ``response_evals`` (mm²/s), ``response_s0``, ``n_response_voxels``
    """
    use = _shell_volumes(bvals, b0_threshold, shell)
    gtab = gradient_table(np.asarray(bvals)[use],
                          bvecs=fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl)[use], affine),
                          b0_threshold=b0_threshold)
    shell_data = data[..., use]
    single_fibre = response_mask(fa, mask)
    response, _ = response_from_mask_ssst(gtab, shell_data, single_fibre)
    fit_mask = np.asarray(mask if fit_mask is None else fit_mask, dtype=bool)
    signals = shell_data[fit_mask].astype(np.float64)
    chunks = [signals[i:i + FIT_CHUNK_VOXELS] for i in range(0, len(signals), FIT_CHUNK_VOXELS)]
    fitted = parallel_map(_fit_chunk, [(c, gtab, response, sh_order) for c in chunks],
                          n_jobs=n_jobs)
    n_coef = (sh_order + 1) * (sh_order + 2) // 2
    sh = np.zeros(fit_mask.shape + (n_coef,), dtype=np.float32)
    if fitted:
        sh[fit_mask] = np.nan_to_num(np.concatenate(fitted))
    info = {"response_evals": [float(v) for v in response[0]],
            "response_s0": float(response[1]), "n_response_voxels": int(single_fibre.sum())}
    return sh, info
