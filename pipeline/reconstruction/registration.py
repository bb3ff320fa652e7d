"""Registration of the subject's FA to the MNI FA template and ROI transfer (DIPY)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from dipy.align import affine_registration
from dipy.align.imaffine import AffineMap
from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
from dipy.align.metrics import CCMetric

#: Mutual information of the rigid and affine stages is estimated on this fraction of the
#: template's voxels (DIPY's regular grid with a fixed-seed jitter, so reruns agree).
#: Against all voxels and 500/100/20 iterations, on five real scans of ../shared/data
#: (philips01, philips02, siemens01, toshiba01, uih01) the warped FA correlated with the
#: template as well or better (e.g. 0.615 → 0.619, 0.831 → 0.833), in a quarter of the
#: time (affine 36–46 s → 6–16 s).
AFFINE_SAMPLING_PROPORTION = 0.3
#: Iterations of the rigid and affine stages, coarsest level first.
AFFINE_LEVEL_ITERS = (100, 50, 10)
#: Gaussian smoothing (voxels) and subsampling of those levels.
AFFINE_SIGMAS = (3.0, 1.0, 0.0)
AFFINE_FACTORS = (4, 2, 1)
#: SyN iterations, coarsest level first.
SYN_LEVEL_ITERS = (10, 10, 5)
#: SyN step length (DIPY's ``syn_registration`` default).
SYN_STEP_LENGTH = 0.25


class ThreadedSyN(SymmetricDiffeomorphicRegistration):
    """DIPY's SyN, with the inversions of its two displacement models on two threads.

    Every SyN iteration inverts the forward and the backward model's fields
    (two fixed-point inversions each, DIPY's Cython, which releases the GIL):
    ~40 % of SyN's time on the MNI template grid. The two models are independent,
    so each model's pair of inversions runs on its own thread, in DIPY's order
    within the model: the result is DIPY's, bit for bit, for any ``n_threads``.
    """

    def __init__(self, metric, *, n_threads=1, **kwargs):
        super().__init__(metric, **kwargs)
        self.n_threads = n_threads

    def _invert_model(self, model, world2grid, spacing):
        model.backward = np.array(self.invert_vector_field(
            model.forward, world2grid, spacing, self.inv_iter, self.inv_tol,
            start=model.backward))
        model.forward = np.array(self.invert_vector_field(
            model.backward, world2grid, spacing, self.inv_iter, self.inv_tol,
            start=model.forward))

    # Overrides DIPY's private ``__invert_models`` (name-mangled), which ``_iterate`` calls
    # once per iteration; a test checks that the name still exists in DIPY.
    def _SymmetricDiffeomorphicRegistration__invert_models(self, world2grid, spacing):
        models = (self.static_to_ref, self.moving_to_ref)
        if self.n_threads < 2:
            for model in models:
                self._invert_model(model, world2grid, spacing)
            return
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(self._invert_model, m, world2grid, spacing)
                           for m in models]:
                future.result()


def affine_to_template(fa, fa_affine, template_fa, template_affine):
    """Centre of mass → rigid → affine (MI) of the subject's FA to the template.

    Returns the (4, 4) matrix from template world to subject world.
    """
    _, matrix = affine_registration(
        np.asarray(fa, dtype=np.float64), np.asarray(template_fa, dtype=np.float64),
        moving_affine=fa_affine, static_affine=template_affine,
        pipeline=["center_of_mass", "rigid", "affine"],
        level_iters=list(AFFINE_LEVEL_ITERS), sigmas=list(AFFINE_SIGMAS),
        factors=list(AFFINE_FACTORS), sampling_proportion=AFFINE_SAMPLING_PROPORTION)
    return matrix


def template_mask_in_subject(fa, fa_affine, template_fa, template_affine, template_mask):
    """The template's brain mask on the subject grid, through :func:`affine_to_template`
    (bool array).

    Where the template says "brain" is known before the subject's brain mask is:
    :func:`pipeline.preprocessing.mask.brain_mask` uses it to keep brainstem that the
    scan's own contrast would lose.
    """
    matrix = affine_to_template(fa, fa_affine, template_fa, template_affine)
    warp = AffineMap(matrix, domain_grid_shape=np.shape(template_fa),
                     domain_grid2world=template_affine, codomain_grid_shape=np.shape(fa),
                     codomain_grid2world=fa_affine)
    return warp.transform_inverse(np.asarray(template_mask, dtype=np.float64),
                                  interpolation="nearest") > 0.5


def register_fa_to_template(fa, fa_affine, template_fa, template_affine, *, n_threads=1):
    """Affine (centre of mass → rigid → affine, MI) then SyN (CC).

    The template is the static image, so the cost of the registration does not
    depend on the subject's resolution. Settings: the module constants, as
    :func:`registration_parameters` records them. ``n_threads`` (1 or 2) only
    speeds SyN up (:class:`ThreadedSyN`); the result does not depend on it.

    Returns
    -------
    mapping : dipy.align.imwarp.DiffeomorphicMap
        ``mapping.transform_inverse`` brings template-space images to the subject grid.
    affine_matrix : ndarray (4, 4)
        The affine part (template world → subject world).
    """
    moving = np.asarray(fa, dtype=np.float64)
    static = np.asarray(template_fa, dtype=np.float64)
    affine_matrix = affine_to_template(moving, fa_affine, static, template_affine)
    # As dipy.align.syn_registration (CC metric, its defaults), without warping the moving
    # image once more at the end.
    syn = ThreadedSyN(CCMetric(3), level_iters=list(SYN_LEVEL_ITERS),
                      step_length=SYN_STEP_LENGTH, n_threads=n_threads)
    mapping = syn.optimize(static, moving, static_grid2world=template_affine,
                           moving_grid2world=fa_affine, prealign=affine_matrix)
    return mapping, affine_matrix


def registration_parameters():
    """The registration's settings, for the provenance of its outputs."""
    return {"affine_pipeline": ["center_of_mass", "rigid", "affine"], "affine_metric": "MI",
            "affine_sampling_proportion": AFFINE_SAMPLING_PROPORTION,
            "affine_level_iters": list(AFFINE_LEVEL_ITERS),
            "affine_sigmas": list(AFFINE_SIGMAS), "affine_factors": list(AFFINE_FACTORS),
            "syn_metric": "CC", "syn_level_iters": list(SYN_LEVEL_ITERS),
            "syn_step_length": SYN_STEP_LENGTH}


def labels_to_subject(mapping, labels):
    """Warp an integer label image from template space to the subject grid (nearest)."""
    warped = mapping.transform_inverse(np.asarray(labels, dtype=np.float64),
                                       interpolation="nearest")
    return np.rint(warped).astype(np.int16)


def template_z_in_subject(mapping, template_affine, template_shape):
    """The template's world z (MNI mm) at every subject voxel, NaN outside the template grid.

    The anatomical height of a point, whatever the head's tilt or the scan's
    slice direction: profiles of both sides are clipped at one MNI height so that
    their nodes start at the same anatomy (:func:`pipeline.steps.track_cst`).
    """
    if not np.allclose(template_affine[2, :2], 0):
        raise ValueError("the template's z axis must be its third voxel axis")
    z = template_affine[2, 2] * np.arange(template_shape[2]) + template_affine[2, 3]
    column = np.ascontiguousarray(np.broadcast_to(z, template_shape), dtype=np.float64)
    # The warp gives 0 outside the template grid; dividing by the warped grid
    # indicator keeps the linear interpolation exact up to the grid's edge.
    inside = mapping.transform_inverse(np.ones(template_shape), interpolation="linear")
    height = mapping.transform_inverse(column, interpolation="linear")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inside > 0.5, height / inside, np.nan).astype(np.float32)


def subject_coordinates_in_template(mapping, subject_affine, subject_shape):
    """The subject's world position (RAS mm) of every template voxel: (X, Y, Z, 3) on
    the template grid, 0 where the template voxel maps outside the subject grid.

    Each world coordinate is a linear function of the subject's voxel indices, so its
    linear interpolation through the warp is exact: a point found in template space
    (a peak of the mirrored asymmetry) is placed where the scan has it.
    """
    ijk = np.indices(subject_shape, dtype=np.float64)
    affine = np.asarray(subject_affine, dtype=np.float64)
    return np.stack([subject_to_template(mapping, np.tensordot(affine[axis, :3], ijk, axes=1)
                                         + affine[axis, 3])
                     for axis in range(3)], axis=-1)


def subject_to_template(mapping, image, *, interpolation="linear"):
    """Warp a subject-space image onto the template grid."""
    return mapping.transform(np.asarray(image, dtype=np.float64), interpolation=interpolation)


def registration_quality(warped_fa, template_fa, template_mask):
    """Pearson correlation of the warped subject FA with the template FA in the template brain."""
    a = warped_fa[template_mask > 0]
    b = template_fa[template_mask > 0]
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def dice(a, b):
    """Dice overlap of two binary masks (1 = identical, 0 = disjoint)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 0.0


def roi_coverage(subject_mask_in_template, template_labels, label_values):
    """Fraction of each template ROI that the subject's brain mask covers.

    A ROI outside the subject's field of view (e.g. a brainstem that was not
    scanned) gets a coverage near 0, whatever the registration did there.
    """
    covered = subject_mask_in_template > 0.5
    coverage = {}
    for name, value in label_values.items():
        roi = template_labels == value
        coverage[name] = float(covered[roi].mean()) if roi.any() else 0.0
    return coverage

