"""b0 reference and a brain mask that keeps the brainstem (DIPY's ``median_otsu``)."""

import numpy as np
from dipy.segment.mask import median_otsu
from dipy.segment.threshold import otsu
from scipy import ndimage

#: Tissue signal: the mean b0 above this fraction of its Otsu threshold (background ~1 %
#: of it; sub-siemens03's dark pons ~75 %).
SIGNAL_FRACTION_OF_OTSU = 0.25
#: How far (mm) from the Otsu mask the template's brain may add voxels.
TEMPLATE_REACH_MM = 15.0
#: Voxels along the first axis whose volumes :func:`mean_over_volumes` copies at once.
MEAN_SLAB = 8


def mean_over_volumes(data, volumes):
    """Mean of ``data[..., volumes]`` (3D float32), slab by slab along the first axis.

    Each voxel's mean is the same float32 reduction as over the whole copy; only
    :data:`MEAN_SLAB` slices of the selected volumes are copied at a time, not the series.
    """
    mean = np.empty(data.shape[:3], dtype=np.float32)
    for start in range(0, data.shape[0], MEAN_SLAB):
        slab = slice(start, start + MEAN_SLAB)
        mean[slab] = data[slab][..., volumes].mean(axis=-1, dtype=np.float32)
    return mean


def mean_b0(data, b0_mask):
    """Mean of the b0 volumes (3D float32)."""
    return mean_over_volumes(data, np.asarray(b0_mask, dtype=bool))


def mean_dwi(data, b0_mask):
    """Mean of the diffusion-weighted volumes (3D float32)."""
    return mean_over_volumes(data, ~np.asarray(b0_mask, dtype=bool))


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
    grid, :func:`pipeline.reconstruction.registration.template_mask_in_subject`) adds the voxels
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
