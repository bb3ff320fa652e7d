"""Several diffusion runs of one session as one series: align, resample, concatenate.

Each run is denoised and de-ringed on its own grid first (both assume the
noise and k-space of one acquisition, as in QSIPrep's default); then every run
is aligned to the first by a rigid registration of its mean b0, resampled
into the first run's grid, and its b-vectors are rotated with it.
"""

import numpy as np
from dipy.align import affine_registration
from dipy.align.imaffine import AffineMap

from ..io.dwi import (
    fsl_bvecs_to_voxel_frame,
    voxel_directions_to_world,
    voxel_frame_to_fsl_bvecs,
    world_directions_to_voxel,
)


def rigid_run_transform(moving_b0, moving_affine, reference_b0, reference_affine):
    """World transform (4×4) taking reference-world points to the moving run's world.

    Rigid (centre of mass → translation → rigid), mutual information, on the mean b0s.
    """
    _, transform = affine_registration(
        moving_b0, reference_b0, moving_affine=moving_affine, static_affine=reference_affine,
        pipeline=["center_of_mass", "translation", "rigid"], level_iters=[1000, 100, 20],
        sigmas=[3.0, 1.0, 0.0], factors=[4, 2, 1])
    return transform


def rotate_fsl_bvecs_between_runs(bvecs_fsl, transform, moving_affine, reference_affine):
    """b-vectors of the moving run (FSL convention) expressed on the reference grid.

    ``transform`` maps reference-world points to moving-world points, so a
    direction measured in the moving run is ``Rᵀ d`` in the reference world
    (R: the rotation of ``transform``).
    """
    rotation = _rotation_part(transform[:3, :3])
    world = voxel_directions_to_world(fsl_bvecs_to_voxel_frame(bvecs_fsl, moving_affine),
                                      moving_affine) @ rotation  # row-wise Rᵀ d
    reference_voxel = world_directions_to_voxel(world, reference_affine)
    zero = np.linalg.norm(bvecs_fsl, axis=1) == 0
    reference_voxel[zero] = 0
    return voxel_frame_to_fsl_bvecs(reference_voxel, reference_affine)


def _rotation_part(linear):
    """The rotation closest to ``linear`` (polar decomposition)."""
    u, _, vt = np.linalg.svd(linear)
    return u @ vt


def rigid_parameters(transform):
    """Translation (mm) and rotation angles about x, y, z (degrees) of a world transform."""
    r = _rotation_part(transform[:3, :3])
    angles = np.degrees([np.arctan2(r[2, 1], r[2, 2]), np.arcsin(-np.clip(r[2, 0], -1, 1)),
                         np.arctan2(r[1, 0], r[0, 0])])
    return np.asarray(transform[:3, 3], dtype=float), angles


def combine_runs(runs):
    """Concatenate runs on the first run's grid.

    Parameters
    ----------
    runs : list of dict
        Each with ``data`` (X, Y, Z, N), ``bvals`` (N,), ``bvecs_fsl`` (N, 3),
        ``affine`` (4, 4) and ``b0`` (mean b0, 3D).

    Returns
    -------
    data : float32 ndarray (X0, Y0, Z0, ΣN)
    bvals : ndarray (ΣN,)
    bvecs_fsl : ndarray (ΣN, 3), FSL convention for the first run's affine
    transforms : list of (4, 4) ndarray, identity for the first run
    """
    reference = runs[0]
    grid, affine = reference["data"].shape[:3], reference["affine"]
    series, bvals, bvecs, transforms = [], [], [], []
    for run in runs:
        if run is reference:
            transform = np.eye(4)
            resampled = np.asarray(run["data"], dtype=np.float32)
            rotated = np.asarray(run["bvecs_fsl"], dtype=float)
        else:
            transform = rigid_run_transform(run["b0"], run["affine"], reference["b0"], affine)
            mapping = AffineMap(transform, domain_grid_shape=grid, domain_grid2world=affine,
                                codomain_grid_shape=run["data"].shape[:3],
                                codomain_grid2world=run["affine"])
            resampled = np.stack([mapping.transform(run["data"][..., v])
                                  for v in range(run["data"].shape[-1])], -1).astype(np.float32)
            rotated = rotate_fsl_bvecs_between_runs(run["bvecs_fsl"], transform, run["affine"],
                                                    affine)
        series.append(np.clip(resampled, 0, None))
        bvals.append(np.asarray(run["bvals"], dtype=float))
        bvecs.append(rotated)
        transforms.append(transform)
    return np.concatenate(series, -1), np.concatenate(bvals), np.concatenate(bvecs), transforms
