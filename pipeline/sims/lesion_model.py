"""Focal CST lesions implanted into real diffusion scans, for validation.

A lesion of the corticospinal tract raises radial diffusivity (demyelination,
axonal loss) while axial diffusivity changes little at first. Here the measured
signal of every voxel in a sphere is multiplied by the signal ratio of two
tensors, the voxel's own fitted tensor ``D`` and the same tensor with both
radial eigenvalues raised by ``delta``::

    S'(g) = S(g) * exp(-b * delta * (1 - (g . e1)^2))

(``e1``: principal eigenvector, ``g``: unit gradient direction, ``b`` in
s/mm²). The scan's own noise, partial volume and artefacts stay; b0 volumes
and every voxel outside the sphere keep their exact values. ``delta`` is
chosen per voxel so that the tensor's FA drops by the requested fraction.
"""

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, fractional_anisotropy

from ..io.dwi import B0_THRESHOLD, fsl_bvecs_to_voxel_frame


def radial_increase_for_fa_drop(evals, fa_drop, *, iterations=60):
    """Per-voxel rise of both radial eigenvalues (mm²/s) that lowers FA by ``fa_drop``.

    Parameters
    ----------
    evals : ndarray (V, 3)
        Tensor eigenvalues, largest first (mm²/s).
    fa_drop : float
        Relative FA reduction, 0 < fa_drop < 1 (0.5: FA halved).

    Returns
    -------
    ndarray (V,)
        ``delta`` >= 0 such that FA(l1, l2 + delta, l3 + delta) = (1 - fa_drop) FA.
    """
    evals = np.clip(np.asarray(evals, dtype=float), 1e-6, None)
    target = (1.0 - fa_drop) * fractional_anisotropy(evals)
    low = np.zeros(len(evals))
    # FA falls while the second eigenvalue stays below the first; beyond, the tensor turns
    # oblate and FA rises again. Bisection on that falling branch (a target below its
    # lowest FA, possible for very non-axial tensors, ends at the branch's end).
    high = evals[:, 0] - evals[:, 1]
    shift = np.array([0.0, 1.0, 1.0])
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        too_anisotropic = fractional_anisotropy(evals + middle[:, None] * shift) > target
        low = np.where(too_anisotropic, middle, low)
        high = np.where(too_anisotropic, high, middle)
    return 0.5 * (low + high)


def implant_lesion(data, bvals, bvecs_fsl, affine, centre_ras_mm, *, radius_mm, fa_drop,
                   b0_threshold=B0_THRESHOLD, brain_mask=None):
    """A copy of ``data`` with a radial-diffusivity lesion in a sphere (see the module).

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
        The scan as stored (any numeric dtype; the result has the same dtype).
    bvals : ndarray (N,), s/mm²
    bvecs_fsl : ndarray (N, 3), FSL/BIDS convention
    affine : ndarray (4, 4), voxel -> world RAS mm
    centre_ras_mm : (3,) world RAS mm
    radius_mm : float
    fa_drop : float
        Relative FA reduction inside the sphere.
    b0_threshold : float, s/mm²
    brain_mask : bool ndarray (X, Y, Z), optional
        Voxels allowed to change (default: every voxel with signal).

    Returns
    -------
    lesioned : ndarray like ``data``
    info : dict
        ``n_voxels``, ``fa_before``/``fa_after`` (means of the tensor fits of the
        sphere's voxels before and after), ``ad_before``/``ad_after`` (mm²/s).
    """
    bvals = np.asarray(bvals, dtype=float)
    ijk = np.indices(data.shape[:3]).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    inside = np.linalg.norm(world - np.asarray(centre_ras_mm, float), axis=1) <= radius_mm
    inside = inside.reshape(data.shape[:3])
    inside &= (data[..., bvals <= b0_threshold].mean(axis=-1) > 0) if brain_mask is None \
        else np.asarray(brain_mask, bool)
    directions = fsl_bvecs_to_voxel_frame(np.asarray(bvecs_fsl, float), affine)
    gtab = gradient_table(bvals, bvecs=directions, b0_threshold=b0_threshold)
    model = TensorModel(gtab)
    signal = data[inside].astype(np.float64)
    before = model.fit(signal)
    delta = radial_increase_for_fa_drop(before.evals, fa_drop)
    along = (directions @ before.evecs[..., 0].T).T ** 2  # (V, N): (g . e1)^2
    factor = np.exp(-bvals[None, :] * delta[:, None] * (1.0 - along))
    factor[:, bvals <= b0_threshold] = 1.0
    changed = signal * factor
    if np.issubdtype(data.dtype, np.integer):
        limits = np.iinfo(data.dtype)
        changed = np.clip(np.rint(changed), limits.min, limits.max)
    lesioned = data.copy()
    lesioned[inside] = changed.astype(data.dtype)
    after = model.fit(lesioned[inside].astype(np.float64))
    info = {"n_voxels": int(inside.sum()),
            "fa_before": round(float(np.mean(before.fa)), 4),
            "fa_after": round(float(np.mean(after.fa)), 4),
            "ad_before": float(np.mean(before.ad)), "ad_after": float(np.mean(after.ad))}
    return lesioned, info


def profile_lesion_site(profile_levels, profile_xyz, level, *, end_nodes, min_nodes=4):
    """Where along a tract profile a lesion of ``level`` goes: its middle node and position.

    Parameters
    ----------
    profile_levels : list of level names per node (one side's profile)
    profile_xyz : (n_nodes, 3) world RAS mm of the nodes
    level : str
    end_nodes : int
        Nodes at each end that detection leaves out (and so a lesion site avoids).
    min_nodes : int
        Fewest nodes of ``level`` inside that window for a site.

    Returns
    -------
    (node, centre_mm) or None when the profile covers too little of ``level``.
    """
    n_nodes = len(profile_levels)
    nodes = [n for n in range(end_nodes, n_nodes - end_nodes) if profile_levels[n] == level]
    if len(nodes) < min_nodes:
        return None
    node = int(nodes[len(nodes) // 2])
    return node, np.asarray(profile_xyz[node], dtype=float)
