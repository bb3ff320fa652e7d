"""Peak memory of a run, stage by stage, from the series' shape and the chunk sizes.

Each heavy stage holds a few whole arrays (the float32 series, a copy of it, maps) and
works through the rest in chunks whose size comes from the memory budget or is fixed
(:func:`pipeline.preprocessing.denoise.mppca_peak_bytes`,
:func:`pipeline.preprocessing.gibbs.gibbs_working_bytes`,
:func:`pipeline.preprocessing.motion.motion_working_bytes`,
:func:`pipeline.reconstruction.tensor.tensor_working_bytes`).
:func:`stage_peak_bytes` adds them up per stage with the same functions the stages size
their chunks with, so the estimate follows the code; :func:`estimated_memory_bytes` is the
largest stage plus the Python processes of the run. The up-front check
(:func:`pipeline.io.dwi.load_dwi`) and the steps' ``mem_gb`` (Nipype's scheduler) use them.
"""

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from .preprocessing import denoise, gibbs, motion
from .reconstruction import tensor

#: Resident memory of one Python process of the run with the pipeline's libraries imported
#: (DIPY, SciPy, Numba, nibabel, Nipype): 261 MiB measured, rounded up. The run has the
#: ``cst-report`` process and one Nipype worker per job.
PROCESS_BYTES = 270 * 2 ** 20
#: float32: every series, map and intermediate image of the pipeline.
FLOAT32_BYTES = 4
#: Per voxel of the grid, the maps the tracking step holds (FA, principal direction, mask,
#: ROIs, MNI height, stopping map, corridor, seeds region; 40 bytes) and the fibre ODF's
#: spherical-harmonic coefficients of order 8 (45 float32), with the copy of the ODF each
#: tracking worker gets (bytes).
TRACKING_BYTES_PER_VOXEL = 40 + 2 * 45 * FLOAT32_BYTES
#: Memory of the report step's drawing in each of its processes (matplotlib, the figures and
#: the maps they show), which with ``n_jobs`` ≥ 2 forks ``n_jobs`` processes of its size:
#: calibrated on sub-philips01 with 2 jobs, where the run peaked in the report at 1.0 GiB
#: above its three Python processes.
REPORT_BYTES = 128 * 2 ** 20
#: Largest share of b0 volumes in a series, for the memory estimate (which reads only the
#: header): HCP 18 of 288, UK Biobank 5 of 105, the shared scans 1–2 of 13–65.
MOTION_B0_FRACTION_BOUND = 0.125
#: Largest share of the grid the CSD fit, and its response estimate, may each take: brain
#: voxels with FA ≥ 0.2 inside the CST search box (2–5 % on the shared scans), and the
#: single-fibre voxels (FA ≥ 0.7, fewer) or at most 3 × 10,000 tissue voxels (multi-shell).
FODF_FIT_FRACTION = 0.1


def series_bytes(shape):
    """Bytes of a float32 series of ``shape`` (X, Y, Z, N)."""
    return FLOAT32_BYTES * int(np.prod([int(n) for n in shape], dtype=np.float64))


def stage_peak_bytes(shape, *, input_itemsize=FLOAT32_BYTES, n_jobs=1, memory_bytes=None):
    """Peak memory (bytes) of each heavy stage (and of the report, which forks) on a series
    of ``shape`` (X, Y, Z, N), beyond its Python process (:data:`PROCESS_BYTES`).

    Parameters
    ----------
    shape : tuple (X, Y, Z, N)
    input_itemsize : int
        Bytes per sample of the input image on disk (2 for int16): the steps that read
        the input (brain mask, denoising) hold it beside its float32 copy while loading.
    n_jobs : int
        Workers of each step.
    memory_bytes : int, optional
        The run's memory budget, which the denoising and the tensor fit size their chunks
        from (None: their default chunks).

    Returns
    -------
    dict
        Stage name (as in :mod:`pipeline.steps`) -> bytes: the whole arrays it holds
        (``S``: the float32 series) plus its working memory.
    """
    nx, ny, nz, n_volumes = (int(n) for n in shape)
    grid = nx * ny * nz
    series = series_bytes(shape)
    loading = series + input_itemsize * grid * n_volumes  # the raw samples, then float32
    maps = 7 * FLOAT32_BYTES * grid  # FA, MD, RD, AD, principal direction
    radius = denoise.mppca_patch_radius(n_volumes)
    # What the denoising step leaves the chunks: the budget less the series
    # (pipeline.steps.denoise).
    mppca_budget = None if memory_bytes is None else max(int(memory_bytes) - series, 0)
    mppca_slab = denoise.mppca_slab_thickness(shape, radius, n_workers=n_jobs,
                                              memory_bytes=mppca_budget)
    tensor_budget = None if memory_bytes is None else max(int(memory_bytes) - series - maps, 0)
    return {
        "brain_mask": max(loading, series + maps + tensor.tensor_working_bytes(
            grid, n_volumes, fit_method="OLS")),
        # and the whole planes of one denoised slab on their way to the file
        "denoise": max(loading, series + denoise.mppca_peak_bytes(
            shape, radius, n_workers=n_jobs, memory_bytes=mppca_budget)
            + FLOAT32_BYTES * nx * ny * min(mppca_slab, nz) * n_volumes),
        "remove_gibbs": series + gibbs.gibbs_working_bytes(shape, n_workers=n_jobs),
        # the corrected series goes to its file volume by volume; its b0s are kept until
        # they are averaged into the reference
        "correct_motion": series + int(MOTION_B0_FRACTION_BOUND * series)
        + motion.motion_working_bytes(shape, n_workers=n_jobs),
        "check_gradients": series + maps + tensor.tensor_working_bytes(
            grid, n_volumes, fit_method="OLS"),
        "fit_tensor": series + maps + tensor.tensor_working_bytes(
            grid, n_volumes, n_workers=n_jobs, memory_bytes=tensor_budget),
        # the series read through its memory map: the response voxels' and the fitted
        # voxels' signals, float32 and float64 copies
        "fit_fodf": series + 2 * int(FODF_FIT_FRACTION * grid) * n_volumes * (4 + 8),
        "track_cst": TRACKING_BYTES_PER_VOXEL * grid,
        # its forked figure processes count their parent's pages again
        "report": (0 if n_jobs < 2 else n_jobs * PROCESS_BYTES)
        + (1 + (n_jobs if n_jobs >= 2 else 0)) * (REPORT_BYTES + 12 * FLOAT32_BYTES * grid),
    }


def estimated_memory_bytes(shape, *, input_itemsize=FLOAT32_BYTES, n_jobs=1,
                           memory_bytes=None):
    """Peak memory (bytes) of a run on a series of ``shape`` (X, Y, Z, N): the largest
    stage (:func:`stage_peak_bytes`) and the run's ``1 + n_jobs`` Python processes.

    The heavy stages run one after the other (each needs the previous one's series), so
    their peaks do not add up; the steps that run beside them (registration, report)
    are of the processes' size.
    """
    stages = stage_peak_bytes(shape, input_itemsize=input_itemsize, n_jobs=n_jobs,
                              memory_bytes=memory_bytes)
    return (1 + max(int(n_jobs), 1)) * PROCESS_BYTES + max(stages.values())


def steps_mem_gb(runs, *, n_jobs, mem_gb=None):
    """Memory (GiB) each heavy step of ``runs`` declares to the scheduler (the node's
    ``mem_gb``, by which MultiProc and SLURM place it): its process and its peak
    (:func:`stage_peak_bytes`) on the runs' series, read from the
    headers; combined runs count as one series with all their volumes.

    Parameters
    ----------
    runs : list of pipeline.io.bids.DwiRun
    n_jobs : int
    mem_gb : float, optional
        The run's memory budget (GiB), which sizes the chunks of some steps.

    Returns
    -------
    dict or None
        Stage name -> GiB; None when a header cannot be read (a graph built from
        placeholder files: its steps declare Nipype's default, and a run checks its
        inputs before it builds the graph).
    """
    try:
        shape, input_itemsize = series_header(runs)
    except (OSError, ImageFileError):
        return None
    peaks = stage_peak_bytes(shape, n_jobs=n_jobs, input_itemsize=input_itemsize,
                             memory_bytes=None if mem_gb is None else int(mem_gb * 2 ** 30))
    return {stage: (PROCESS_BYTES + peak) / 2 ** 30 for stage, peak in peaks.items()}


def series_header(runs):
    """The shape (X, Y, Z, N) and the input's bytes per sample of the series that ``runs``
    make, read from their headers: combined runs are one series with all their volumes.

    Parameters
    ----------
    runs : list of pipeline.io.bids.DwiRun
        One run, or the runs combined into one series.

    Returns
    -------
    shape : tuple of int
    input_itemsize : int
        The largest of the runs' (they are read into one float32 series).

    Raises
    ------
    OSError, nibabel.filebasedimages.ImageFileError
        A header cannot be read.
    """
    images = [nib.load(str(run.dwi)) for run in runs]
    shape = (*images[0].shape[:3], sum(img.shape[3] for img in images))
    return shape, max(img.get_data_dtype().itemsize for img in images)
