"""Thermal-noise removal: MP-PCA (default) or Patch2Self.

MP-PCA here is DIPY's estimator (:func:`dipy.denoise.localpca.mppca`:
Veraart et al. 2016 eigenvalue classifier, Manjón et al. 2013 overlapping-patch
weighting) evaluated for thousands of patches at once with batched numpy
linear algebra. DIPY runs it one voxel at a time in a Python loop, which took
108 s on a 128×128×60×33 scan; the batched form gives the same numbers
(checked against DIPY in the tests) in a fraction of that time. The pipeline
centres patches on every second voxel (:data:`PIPELINE_PATCH_STRIDE`), which
costs a sixth as much for practically the same result.
"""

import numpy as np

from ..parallel import parallel_imap_threads

DENOISE_METHODS = ("mppca", "patch2self", "none")

#: Most patches handled together in one batched eigendecomposition
#: (:func:`mppca_patch_batch`).
PATCH_BATCH = 2048
#: Most memory of one patch batch (1 GiB): 2,048 patches up to 71 volumes at 5×5×5 (every
#: shared scan; 33 volumes: 0.4 GB), fewer beyond (288 volumes at 7×7×7: 162 patches).
PATCH_BATCH_BYTES = 2 ** 30
#: Slices per parallel work unit when no memory budget is given.
SLAB_THICKNESS = 16
#: Default patch-centre spacing of the pipeline's MP-PCA: every second voxel along each axis,
#: so each voxel still averages 27 overlapping 5×5×5 patch estimates (DIPY: 125). On
#: sub-philips01 with simulated Rician noise (σ = 1400, truth = its stride-1 denoised
#: series) the error to the truth rose 2 % (1238 → 1260) and the FA error did not change
#: (mean |ΔFA| 0.0083 → 0.0084), for 1/6 of the time (30 s → 5 s on one core).
PIPELINE_PATCH_STRIDE = 2
#: Smallest patch half-width (voxels) of the pipeline's MP-PCA: 5×5×5 patches, DIPY's
#: default; :func:`mppca_patch_radius` widens it for series of more than 124 volumes.
PIPELINE_PATCH_RADIUS = 2


def mppca_patch_radius(n_volumes, minimum=PIPELINE_PATCH_RADIUS):
    """Smallest patch half-width ≥ ``minimum`` for which MP-PCA is valid on ``n_volumes``.

    The Marchenko–Pastur fit needs more samples than dimensions: a cubic patch of
    ``(2r+1)³`` voxels, less one for the mean, must hold at least ``n_volumes`` voxels
    (the condition under which DIPY's ``genpca`` does not warn, and its suggested
    radius). 33 volumes: 2 (125 voxels); 288 volumes (HCP): 3 (343 voxels).
    """
    radius = int(minimum)
    while (2 * radius + 1) ** 3 - 1 < n_volumes:
        radius += 1
    return radius


def mppca_bytes_per_patch(n_volumes, patch_radius):
    """Working memory (bytes) of one patch in a batched MP-PCA step.

    Five float64 arrays of ``voxels × volumes`` (the patch, its centred copy, the
    projection, the estimate and a temporary) and four of ``volumes²`` (covariance,
    eigenvectors, LAPACK's copy, kept components). Measured peaks (2,048 patches, one
    thread): 0.36 GiB at 33 volumes, 6.6 GiB at 288 with 5×5×5 patches, below this.
    """
    voxels = (2 * patch_radius + 1) ** 3
    return 8 * (5 * voxels * n_volumes + 4 * n_volumes ** 2)


def mppca_bytes_per_slab_voxel(n_volumes):
    """Working memory (bytes) per voxel of a slab: the float64 weighted sum of the patch
    estimates and the float32 result, each ``n_volumes`` long."""
    return (8 + 4) * n_volumes


def mppca_patch_batch(n_volumes, patch_radius):
    """Patches per batched eigendecomposition: :data:`PATCH_BATCH`, or fewer so that a
    batch needs at most :data:`PATCH_BATCH_BYTES` (:func:`mppca_bytes_per_patch`).

    A function of the series' shape only, not of the machine's memory: the batches set
    the order in which overlapping patch estimates are summed, which changes the result
    in the last float bit, and the same scan must give the same numbers everywhere.
    """
    fitting = PATCH_BATCH_BYTES // mppca_bytes_per_patch(n_volumes, patch_radius)
    return int(np.clip(fitting, 16, PATCH_BATCH))


def mppca_slab_thickness(shape, patch_radius, *, n_workers=1, memory_bytes=None):
    """Slices per MP-PCA work unit that fit a memory budget (the result does not depend
    on it, see :func:`mppca`).

    Parameters
    ----------
    shape : tuple (X, Y, Z, N)
        The series (its brain bounding box) to denoise.
    patch_radius : int
    n_workers : int
        Slabs processed at the same time; each gets an equal share of the budget.
    memory_bytes : int, optional
        Memory all workers together may use beyond the input and output arrays.
        None: :data:`SLAB_THICKNESS`.

    Returns
    -------
    int
        At most :data:`SLAB_THICKNESS`, at least one slice (so a budget below one slice
        and one patch batch is exceeded, not refused).
    """
    if memory_bytes is None:
        return SLAB_THICKNESS
    nx, ny, _, n_volumes = shape
    share = memory_bytes / max(int(n_workers), 1)
    share -= mppca_patch_batch(n_volumes, patch_radius) * mppca_bytes_per_patch(
        n_volumes, patch_radius)
    slice_bytes = mppca_bytes_per_slab_voxel(n_volumes) * nx * ny
    slab = int(share // slice_bytes) - 4 * patch_radius  # slabs are padded on both sides
    return int(np.clip(slab, 1, SLAB_THICKNESS))


def mppca_peak_bytes(shape, patch_radius, *, n_workers=1, memory_bytes=None):
    """Working memory (bytes) of :func:`mppca` with :func:`mppca_slab_thickness` and
    :func:`mppca_patch_batch`, beyond its float32 input and output arrays."""
    nx, ny, nz, n_volumes = shape
    slab = mppca_slab_thickness(shape, patch_radius, n_workers=n_workers,
                                memory_bytes=memory_bytes)
    slab_bytes = ((min(slab, nz) + 4 * patch_radius) * nx * ny
                  * mppca_bytes_per_slab_voxel(n_volumes))
    batch_bytes = (mppca_patch_batch(n_volumes, patch_radius)
                   * mppca_bytes_per_patch(n_volumes, patch_radius))
    return max(int(n_workers), 1) * (slab_bytes + batch_bytes)


def mask_bounding_box(mask, margin=2):
    """Slices of the smallest box holding ``mask``, padded by ``margin`` voxels."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
                 for i, n in zip(idx, mask.shape))


def marchenko_pastur_noise(eigenvalues, n_samples):
    """Noise variance from sorted PCA eigenvalues (Veraart et al. 2016), for many patches.

    Vectorised form of DIPY's ``_pca_classifier``: the largest ``c`` whose
    eigenvalue spread ``λ_c − λ_0`` fits inside the Marchenko–Pastur
    bulk of width ``4 √((c+1)/n) σ²``, with ``σ²`` the mean of the ``c+1``
    smallest eigenvalues.

    Parameters
    ----------
    eigenvalues : ndarray (B, N)
        Eigenvalues of each patch's covariance, ascending.
    n_samples : int
        Voxels per patch.

    Returns
    -------
    ndarray (B,)
        Noise variance per patch (signal units squared).
    """
    eigenvalues = eigenvalues[:, -(n_samples - 1):] if eigenvalues.shape[1] > n_samples - 1 \
        else eigenvalues
    count = np.arange(1, eigenvalues.shape[1] + 1)
    running_mean = np.cumsum(eigenvalues, axis=1) / count
    spread = eigenvalues - eigenvalues[:, :1] - 4 * np.sqrt(count / n_samples) * running_mean
    inside = spread <= 0
    # DIPY walks down from the largest eigenvalue and stops at the first one inside the bulk.
    last_inside = eigenvalues.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
    return running_mean[np.arange(len(eigenvalues)), last_inside]


def _mppca_block(block, block_mask, patch_radius, stride_phase, patch_stride, patch_batch):
    """MP-PCA of one block: every masked voxel's patch at the stride grid, accumulated.

    Returns (denoised, sigma) for the block, float32; NaN where no patch reached.
    """
    r = patch_radius
    width = 2 * r + 1
    n_vol = block.shape[-1]
    n_samples = width ** 3
    tau_factor = 1 + np.sqrt(n_vol / n_samples)
    # Patches are cast to float64 batch by batch (exact), not the whole slab.
    windows = np.lib.stride_tricks.sliding_window_view(block, (width,) * 3, axis=(0, 1, 2))
    valid = np.zeros(block_mask.shape, dtype=bool)
    valid[r:-r or None, r:-r or None, r:-r or None] = block_mask[r:-r or None, r:-r or None,
                                                                 r:-r or None]
    for axis, phase in enumerate(stride_phase):
        keep = (np.arange(block.shape[axis]) - phase) % patch_stride == 0
        valid &= np.expand_dims(keep, tuple(a for a in range(3) if a != axis))
    centres = np.argwhere(valid)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)

    weight = np.zeros(block.shape[:3])
    weighted_signal = np.zeros(block.shape)
    weighted_variance = np.zeros(block.shape[:3])
    for start in range(0, len(centres), patch_batch):
        c = centres[start:start + patch_batch]
        patches = windows[c[:, 0] - r, c[:, 1] - r, c[:, 2] - r]  # (B, N, w, w, w)
        patches = patches.reshape(len(c), n_vol, n_samples).transpose(0, 2, 1).astype(
            np.float64)
        mean = patches.mean(axis=1, keepdims=True)
        centred = patches - mean
        covariance = centred.transpose(0, 2, 1) @ centred / n_samples
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        variance = marchenko_pastur_noise(eigenvalues, n_samples)
        signal_components = eigenvalues >= (tau_factor ** 2 * variance)[:, None]
        kept = eigenvectors * signal_components[:, None, :]
        estimate = (centred @ kept) @ kept.transpose(0, 2, 1) + mean
        # Manjón et al. 2013: patches that kept fewer components are trusted more.
        theta = 1.0 / (1.0 + signal_components.sum(axis=1))
        for p, (di, dj, dk) in enumerate(offsets):
            # Fixed offset: target voxels are distinct for distinct centres, so += is exact.
            target = (c[:, 0] + di, c[:, 1] + dj, c[:, 2] + dk)
            weight[target] += theta
            weighted_signal[target] += estimate[:, p, :] * theta[:, None]
            weighted_variance[target] += variance * theta
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted_signal /= weight[..., None]  # in place: one slab-sized float64 array less
        sigma = np.sqrt(weighted_variance / weight)
    return weighted_signal.astype(np.float32), sigma.astype(np.float32)


def mppca(data, mask, *, patch_radius=2, patch_stride=1, slab_thickness=SLAB_THICKNESS,
          patch_batch=None, n_jobs=1):
    """MP-PCA denoising (DIPY's estimator, batched) over slabs along the third axis.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    mask : bool ndarray (X, Y, Z)
        Patches are centred on masked voxels only (as in DIPY).
    patch_radius : int
        Patch half-width in voxels (2: 5×5×5 = 125 voxels per patch).
    patch_stride : int
        Centre a patch on every ``patch_stride``-th voxel along each axis
        (1: every voxel, identical to DIPY). Every voxel is still covered by
        ``⌈(2r+1)/stride⌉³`` overlapping patches.
    slab_thickness : int
        Slices per parallel work unit. Slabs are padded by ``2 * patch_radius``
        slices, so each kept voxel sees exactly the patches a whole-volume run
        gives it: the result does not depend on the slabs or on ``n_jobs``.
    patch_batch : int, optional
        Patches per batched eigendecomposition (None: :func:`mppca_patch_batch`). It
        sets the order in which overlapping estimates are summed, so it changes the
        result in the last float bit.
    n_jobs : int
        joblib workers.

    Returns
    -------
    denoised : float32 ndarray (X, Y, Z, N)
        NaN where no patch reached (the caller keeps the measured signal there).
    sigma : float32 ndarray (X, Y, Z)
        Noise standard deviation (signal units).
    """
    denoised = np.empty(data.shape, dtype=np.float32)
    sigma = np.empty(data.shape[:3], dtype=np.float32)
    for slices, slab_denoised, slab_sigma in mppca_slabs(
            data, mask, patch_radius=patch_radius, patch_stride=patch_stride,
            slab_thickness=slab_thickness, patch_batch=patch_batch, n_jobs=n_jobs):
        denoised[:, :, slices] = slab_denoised
        sigma[:, :, slices] = slab_sigma
    return denoised, sigma


def mppca_slabs(data, mask, *, patch_radius=2, patch_stride=1, slab_thickness=SLAB_THICKNESS,
                patch_batch=None, n_jobs=1):
    """:func:`mppca` slab by slab: yields ``(slices, denoised, sigma)`` for each slab of
    slices along the third axis as it finishes (in no particular order), so that the
    caller can store it and let it go. ``data`` is only read. Parameters as :func:`mppca`.
    """
    if patch_batch is None:
        patch_batch = mppca_patch_batch(data.shape[-1], patch_radius)
    pad = 2 * patch_radius
    nz = data.shape[2]
    cores = [(z, min(z + slab_thickness, nz)) for z in range(0, nz, slab_thickness)]
    spans = [(max(a - pad, 0), min(b + pad, nz)) for a, b in cores]
    # The slabs with the most brain go first, so that the workers finish together.
    order = sorted(range(len(spans)), key=lambda i: -int(mask[:, :, slice(*cores[i])].sum()))
    jobs = [(data[:, :, lo:hi], mask[:, :, lo:hi], patch_radius, (0, 0, (-lo) % patch_stride),
             patch_stride, patch_batch) for lo, hi in (spans[i] for i in order)]
    # numpy releases the GIL in the batched eigendecompositions and products, so the slabs
    # run on threads sharing the arrays (sub-philips01: 5.6 s on two threads, 7.9 s on two
    # worker processes, 8.7 s serial). Each slab's result is stored as it arrives, so only
    # a few slabs' working arrays are alive at once.
    results = parallel_imap_threads(_mppca_block, jobs, n_jobs=n_jobs)
    for i, (d, s) in zip(order, results):
        (a, b), (lo, _) = cores[i], spans[i]
        yield slice(a, b), d[:, :, a - lo:b - lo], s[:, :, a - lo:b - lo]


def patch2self(data, bvals):
    """Patch2Self (Fadnavis et al. 2020; DIPY, OLS) of a 4D series, float32.

    DIPY ≤ 1.12 writes stale values into the last ``N % 5`` volumes
    (dipy/dipy#3968, fixed after 1.12.1). Each volume's regression does not
    depend on its position, so those volumes are taken from a second pass
    in which they come first.
    """
    from dipy.denoise.patch2self import patch2self as dipy_patch2self

    def run(order):
        return dipy_patch2self(data[..., order], np.asarray(bvals)[order], model="ols",
                               shift_intensity=True, clip_negative_vals=False,
                               verbose=False).astype(np.float32)

    n = data.shape[-1]
    trailing = n % 5
    denoised = run(np.arange(n))
    if trailing:
        again = run(np.r_[n - trailing:n, 0:n - trailing])
        denoised[..., n - trailing:] = again[..., :trailing]
    return denoised


def _denoised_slice(estimate, measured, mask):
    """One slice (X, Y, N) of the denoised series: ``estimate`` clipped at 0 inside
    ``mask`` (X, Y), the ``measured`` signal outside it and where no patch reached
    (``estimate`` NaN, at the edge of the box)."""
    estimate = np.where(np.isfinite(estimate), estimate, measured)
    return np.where(mask[:, :, None], np.clip(estimate, 0, None), measured)


def denoise_dwi(data, mask, bvals, *, method="mppca", patch_radius=None,
                patch_stride=PIPELINE_PATCH_STRIDE, n_jobs=1, memory_bytes=None,
                overwrite=False, write_slices=None):
    """Denoise a 4D DWI series inside the brain mask.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    mask : bool ndarray (X, Y, Z)
    bvals : ndarray (N,), s/mm²
    method : {"mppca", "patch2self", "none"}
        MP-PCA (Veraart et al. 2016) or Patch2Self (Fadnavis et al. 2020).
    patch_radius, patch_stride : int
        MP-PCA patch geometry (see :func:`mppca`); ``patch_stride=1`` reproduces
        DIPY exactly, the default is :data:`PIPELINE_PATCH_STRIDE`. ``patch_radius``
        None: :func:`mppca_patch_radius` of the number of volumes.
    n_jobs : int
        Workers for MP-PCA (the result does not depend on it).
    memory_bytes : int, optional
        MP-PCA's working-memory budget (:func:`mppca_slab_thickness`; the result does
        not depend on it). None: :data:`SLAB_THICKNESS`.
    overwrite : bool
        Denoise a float32 ``data`` in place (saves a copy of the series; the caller
        no longer has the measured signal).
    write_slices : callable, optional
        ``write_slices(z_start, block)`` takes the denoised series in blocks of whole
        slices (float32 (X, Y, t, N), slices ``z_start`` …), e.g. the ``slices`` method
        of :func:`pipeline.io.outputs.nifti_volume_writer`; ``denoised`` is then None. With
        MP-PCA, ``data`` is only read and each slab goes as it finishes, so that the
        series is never held twice.

    Returns
    -------
    denoised : float32 ndarray, same shape as ``data``, or None (``write_slices``)
    noise_sigma : float32 ndarray (X, Y, Z) or None
        Noise standard deviation (signal units): MP-PCA's estimate, or for
        Patch2Self the standard deviation of what it removed; None for "none".
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"unknown denoising method {method!r}; use one of {DENOISE_METHODS}")
    if write_slices is not None and method == "mppca":
        return None, _denoise_mppca_by_slabs(
            np.asarray(data, dtype=np.float32), mask, write_slices, patch_radius=patch_radius,
            patch_stride=patch_stride, n_jobs=n_jobs, memory_bytes=memory_bytes)
    in_place = overwrite and data.dtype == np.float32
    out = data if in_place else np.array(data, dtype=np.float32, copy=True)
    sigma = None
    if method != "none":
        box = mask_bounding_box(mask)
        measured = out[box]  # a view: the result is written back into it
        sigma = np.zeros(mask.shape, dtype=np.float32)
        if method == "mppca":
            if patch_radius is None:
                patch_radius = mppca_patch_radius(data.shape[-1])
            slab = mppca_slab_thickness(measured.shape, patch_radius, n_workers=n_jobs,
                                        memory_bytes=memory_bytes)
            den, box_sigma = mppca(measured, mask[box], patch_radius=patch_radius,
                                   patch_stride=patch_stride, slab_thickness=slab,
                                   n_jobs=n_jobs)
            sigma[box] = np.nan_to_num(box_sigma)
        else:
            den = patch2self(measured, bvals)
            sigma[box] = np.std(measured - den, axis=-1)
        # slice by slice, so that the temporaries stay small
        box_mask = mask[box]
        for k in range(measured.shape[2]):
            measured[:, :, k] = _denoised_slice(den[:, :, k], measured[:, :, k],
                                                box_mask[:, :, k])
    if write_slices is None:
        return out, sigma
    write_slices(0, out)
    return None, sigma


def _denoise_mppca_by_slabs(data, mask, write_slices, *, patch_radius, patch_stride, n_jobs,
                            memory_bytes):
    """:func:`denoise_dwi`'s MP-PCA, each slab of the brain box handed to ``write_slices``
    with the whole planes of its slices as it finishes; the slices outside the box as
    measured. Returns the noise map."""
    box = mask_bounding_box(mask)
    measured = data[box]  # a view, only read
    box_mask = mask[box]
    if patch_radius is None:
        patch_radius = mppca_patch_radius(data.shape[-1])
    slab = mppca_slab_thickness(measured.shape, patch_radius, n_workers=n_jobs,
                                memory_bytes=memory_bytes)
    first, last = box[2].start, box[2].stop
    for z in [*range(first), *range(last, data.shape[2])]:
        write_slices(z, data[:, :, z:z + 1])
    sigma = np.zeros(mask.shape, dtype=np.float32)
    for slices, den, box_sigma in mppca_slabs(measured, box_mask, patch_radius=patch_radius,
                                              patch_stride=patch_stride, slab_thickness=slab,
                                              n_jobs=n_jobs):
        block = np.array(data[:, :, first + slices.start:first + slices.stop])
        in_box = block[box[0], box[1]]  # a view into the block
        for k in range(in_box.shape[2]):
            in_box[:, :, k] = _denoised_slice(den[:, :, k], in_box[:, :, k],
                                              box_mask[:, :, slices.start + k])
        write_slices(first + slices.start, block)
        sigma[box][:, :, slices] = np.nan_to_num(box_sigma)
    return sigma
