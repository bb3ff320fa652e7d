"""How precisely a scan measures the CST's FA profile: bootstrap replicates of the profiles.

Two sources of error are resampled together, so that every replicate is a profile
the same scan could have given:

- **measurement noise**, by a wild bootstrap of the tensor fit (Whitcher et al.
  2008, doi:10.1002/hbm.20395): the log-signal residuals of the ordinary
  least-squares fit, leverage-corrected, get random signs and are refitted in
  every voxel the profiles sample;
- **streamline sampling**, by drawing each side's streamlines with replacement
  (the bundle is a sample of the tract).

The spread of the replicates is the scan's own uncertainty of FA and of the
asymmetry index at every node; :mod:`pipeline.tractometry.localization` calibrates its
detection on it.
"""

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import design_matrix, fractional_anisotropy, from_lower_triangular
from dipy.tracking.streamline import Streamlines, values_from_volume

from ..io.dwi import fsl_bvecs_to_voxel_frame
from .profiles import N_NODES, asymmetry_index, gaussian_node_weights, resample_bundle

#: Bootstrap replicates of every profile.
N_BOOTSTRAP = 200
#: Replicates whose tensors are refitted at once (bounds the memory to ~100 MB).
REPLICATE_BATCH = 10
#: Smallest signal entering the log-linear fit (as DIPY's ``min_signal``).
MIN_SIGNAL = 1e-6


def _ols_fa(log_signal, pseudo_inverse):
    """FA from log signals (..., n_volumes) by ordinary least squares."""
    lower = (log_signal @ pseudo_inverse.T)[..., :6]
    evals = np.linalg.eigvalsh(from_lower_triangular(lower))
    return fractional_anisotropy(evals)


def wild_bootstrap_fa(signal, bvals, bvecs_fsl, affine, *, b0_threshold, n_boot=N_BOOTSTRAP,
                      random_seed=0):
    """FA deviations of a wild bootstrap of the tensor fit, per voxel.

    Parameters
    ----------
    signal : ndarray (V, n_volumes)
        The diffusion signal of V voxels (only the volumes the tensor fit uses).
    bvals : ndarray (n_volumes,), s/mm²
    bvecs_fsl : ndarray (n_volumes, 3), FSL/BIDS convention
    affine : ndarray (4, 4)
        The scan's affine (the FSL convention depends on its handedness).
    b0_threshold : float, s/mm²
    n_boot : int
    random_seed : int

    Returns
    -------
    ndarray (n_boot, V), float32
        FA of each replicate minus the FA of the fit itself: add it to any FA
        map of the same voxels to get a replicate of that map.
    """
    gtab = gradient_table(bvals, bvecs=fsl_bvecs_to_voxel_frame(bvecs_fsl, affine),
                          b0_threshold=b0_threshold)
    design = design_matrix(gtab)
    pseudo_inverse = np.linalg.pinv(design)
    log_signal = np.log(np.maximum(np.asarray(signal, dtype=np.float64), MIN_SIGNAL))
    fitted = log_signal @ pseudo_inverse.T @ design.T
    leverage = np.einsum("ij,ji->i", design, pseudo_inverse)
    # HC2 correction: raw residuals understate the error where a volume pulls its fit.
    residuals = (log_signal - fitted) / np.sqrt(np.maximum(1.0 - leverage, 1e-6))
    fa_fit = _ols_fa(fitted, pseudo_inverse)
    rng = np.random.default_rng(random_seed)
    deviations = np.empty((n_boot, len(log_signal)), dtype=np.float32)
    for start in range(0, n_boot, REPLICATE_BATCH):
        count = min(REPLICATE_BATCH, n_boot - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(count,) + residuals.shape)
        deviations[start:start + count] = _ols_fa(fitted + signs * residuals,
                                                  pseudo_inverse) - fa_fit
    return deviations


def bundle_samples(bundle, fa, affine, n_nodes=N_NODES):
    """What a profile is made of: FA at each node of each streamline, the nodes'
    core weights, and the voxel each node falls in.

    Returns
    -------
    values : ndarray (S, n_nodes)
        FA interpolated trilinearly at the equally spaced nodes (as ``afq_profile``).
    weights : ndarray (S, n_nodes)
        :func:`pipeline.tractometry.profiles.gaussian_node_weights`.
    voxels : ndarray (S, n_nodes, 3), int
        Nearest voxel of every node.
    """
    resampled = resample_bundle(bundle, n_nodes)
    values = np.asarray(values_from_volume(np.asarray(fa, dtype=np.float64),
                                           Streamlines(list(resampled)), affine))
    ijk = np.rint(resampled @ np.linalg.inv(affine)[:3, :3].T
                  + np.linalg.inv(affine)[:3, 3]).astype(int)
    voxels = np.clip(ijk, 0, np.array(fa.shape) - 1)
    return values, gaussian_node_weights(resampled), voxels


def bootstrap_profiles(values, weights, node_voxels, fa_deviations, *, random_seed=0):
    """Replicates of a weighted FA profile: streamlines drawn with replacement, FA perturbed.

    Parameters
    ----------
    values, weights : ndarray (S, n_nodes)
        From :func:`bundle_samples`.
    node_voxels : ndarray (S, n_nodes), int
        Index of each node's voxel into the columns of ``fa_deviations``.
    fa_deviations : ndarray (B, V)
        :func:`wild_bootstrap_fa`; one replicate per row.

    Returns
    -------
    ndarray (B, n_nodes)
    """
    rng = np.random.default_rng(random_seed)
    n_boot, n_streamlines = len(fa_deviations), len(values)
    replicates = np.empty((n_boot, values.shape[1]))
    for b in range(n_boot):
        drawn = rng.integers(0, n_streamlines, n_streamlines)
        w = weights[drawn]
        perturbed = values[drawn] + fa_deviations[b][node_voxels[drawn]]
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates[b] = (w * perturbed).sum(axis=0) / w.sum(axis=0)
    return replicates


def asymmetry_replicates(bundles, fa, signal_of, affine, *, bvals, bvecs_fsl, b0_threshold,
                         n_boot=N_BOOTSTRAP, random_seed=0):
    """Bootstrap replicates of both sides' FA profiles and of their asymmetry index.

    Parameters
    ----------
    bundles : dict side -> list of streamlines (world mm, inferior end first)
    fa : ndarray (X, Y, Z)
        The FA map the profiles are measured on.
    signal_of : callable
        ``signal_of(ijk)`` gives the diffusion signal (V, n_volumes) of the voxels
        ``ijk`` (V, 3), restricted to the volumes of the tensor fit.
    affine : ndarray (4, 4)
    bvals, bvecs_fsl : the volumes of the tensor fit
    b0_threshold : float, s/mm²
    n_boot, random_seed : int
        The same seed gives the same replicates.

    Returns
    -------
    dict with ``fa`` (side -> (B, n_nodes)) and ``ai`` ((B, n_nodes)); empty
    when a side has no streamline.
    """
    if any(len(bundle) == 0 for bundle in bundles.values()):
        return {}
    samples = {side: bundle_samples(bundle, fa, affine) for side, bundle in bundles.items()}
    all_voxels = np.concatenate([s[2].reshape(-1, 3) for s in samples.values()])
    unique, inverse = np.unique(all_voxels, axis=0, return_inverse=True)
    deviations = wild_bootstrap_fa(signal_of(unique), bvals, bvecs_fsl, affine,
                                   b0_threshold=b0_threshold, n_boot=n_boot,
                                   random_seed=random_seed)
    replicates, offset = {}, 0
    for k, (side, (values, weights, voxels)) in enumerate(samples.items()):
        index = inverse.ravel()[offset:offset + voxels[..., 0].size].reshape(values.shape)
        offset += voxels[..., 0].size
        replicates[side] = bootstrap_profiles(values, weights, index, deviations,
                                              random_seed=random_seed + 1 + k)
    return {"fa": replicates, "ai": asymmetry_index(replicates["left"], replicates["right"])}
