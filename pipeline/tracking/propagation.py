"""CST tractography: tensor peaks, seeding, the tracking corridor and parallel tracking
(tensor or CSD); the anatomical selection of the tracts is :mod:`pipeline.tracking.selection`.

All streamlines are in world RAS+ millimetres.
"""

import numpy as np
from dipy.data import default_sphere
from nibabel.affines import apply_affine, voxel_sizes

from ..parallel import dask_backend, parallel_map
from ..reconstruction import fodf
from . import cone, eudx

#: Seeds per tracking chunk. The chunk layout (hence the output) never depends on n_jobs.
SEED_CHUNK_SIZE = 4000
#: How far above ``fa_stop`` a bridged voxel is set in the stopping map.
BRIDGE_MARGIN = 0.01
#: Directions the CSD direction getters sample the fibre ODF on (362 vertices, ~9.5° apart).
TRACKING_SPHERE = default_sphere


def tensor_peaks(v1, fa, mask):
    """The tensor's principal direction as one peak per voxel, for :mod:`pipeline.tracking.eudx`.

    Each brain voxel's exact eigenvector is its peak, so no direction is rounded to
    a sphere (and no ODF has to be sampled); outside ``mask`` the peak's value is 0,
    so it never votes.

    Returns
    -------
    peak_values : float64 (X, Y, Z), the FA inside ``mask``
    peak_directions : float64 (X, Y, Z, 3), voxel-frame unit vectors (0 outside ``mask``)
    """
    mask = np.asarray(mask, dtype=bool)
    peak_values = np.where(mask, np.asarray(fa, dtype=np.float64), 0.0)
    peak_directions = np.where(mask[..., None], np.asarray(v1, dtype=np.float64), 0.0)
    return peak_values, peak_directions


def seeds_in_mask(mask, affine, *, seeds_per_voxel, random_seed):
    """Random seeds (world mm), ``seeds_per_voxel`` uniformly inside each voxel of ``mask``.

    Seeds are generated in world terms: voxels are visited in world-coordinate
    order and the in-voxel offsets use the voxel axes re-ordered and re-signed
    to point along +x, +y, +z. The same scan stored with flipped or permuted
    axes therefore gets the same seeds, and so the same streamlines.
    """
    ijk = np.argwhere(np.asarray(mask, dtype=bool))
    if len(ijk) == 0:
        return np.zeros((0, 3))
    centres = apply_affine(affine, ijk)
    centres = centres[np.lexsort(np.round(centres, 3).T[::-1])]  # by x, then y, then z
    linear = affine[:3, :3]
    dominant = np.abs(linear).argmax(axis=0)  # world axis each voxel axis runs along
    canonical = np.zeros((3, 3))
    for axis in range(3):
        column = linear[:, axis]
        canonical[:, dominant[axis]] = column * np.sign(column[dominant[axis]])
    offsets = np.random.default_rng(random_seed).uniform(
        -0.5, 0.5, size=(len(centres), seeds_per_voxel, 3))
    return (centres[:, None, :] + offsets @ canonical.T).reshape(-1, 3)


def corridor_mask(waypoints_mm, shape, affine, *, radius_mm):
    """Voxels within ``radius_mm`` of the polyline through ``waypoints_mm`` (world mm).

    Parameters
    ----------
    waypoints_mm : (K, 3) world RAS mm, in order along the tract
    shape : grid shape ; affine : (4, 4) voxel → world
    radius_mm : float

    Returns
    -------
    bool ndarray of ``shape``
    """
    ijk = np.indices(shape).reshape(3, -1).T
    points = apply_affine(affine, ijk)
    distance = np.full(len(points), np.inf)
    for a, b in zip(waypoints_mm[:-1], waypoints_mm[1:]):
        segment = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
        along = np.clip((points - a) @ segment / max(segment @ segment, 1e-12), 0.0, 1.0)
        distance = np.minimum(distance, np.linalg.norm(points - a - along[:, None] * segment,
                                                       axis=1))
    return (distance <= radius_mm).reshape(shape)


def bridge_low_fa(fa, corridor, *, fa_stop, gap_fa):
    """Stopping map that lets tracking cross low FA inside the CST corridor.

    A focal lesion lowers FA, sometimes below ``fa_stop``, while the fibres' direction
    survives; stopping there would lose the damaged tract, and with it the evidence.
    Inside ``corridor`` voxels with FA ≥ ``gap_fa`` are therefore raised to just
    above ``fa_stop`` (+ :data:`BRIDGE_MARGIN`; DIPY goes on only where the map
    exceeds the threshold) in the map the tracker stops on; the FA measured along
    the tract is untouched. Outside the corridor nothing changes.
    """
    bridged = np.asarray(fa, dtype=np.float32).copy()
    lift = np.asarray(corridor, dtype=bool) & (bridged >= gap_fa) & (bridged <= fa_stop)
    bridged[lift] = fa_stop + BRIDGE_MARGIN
    return bridged


def _track_chunk_in_cone(seeds, fields, affine, params, random_seed, *, deterministic):
    """One seed chunk through :func:`pipeline.tracking.cone.track_seeds` (CSD)."""
    shape = np.array(fields["stop_map"].shape, dtype=np.int64)
    sh = np.asarray(fields["sh"])
    return cone.track_seeds(
        np.ascontiguousarray(seeds, dtype=np.float64), np.asarray(affine, dtype=np.float64),
        sh.reshape(-1, sh.shape[-1]), np.asarray(fields["odf_max"]).reshape(-1),
        np.asarray(fields["stop_map"]).reshape(-1), shape, params["stop_threshold"],
        fields["basis"], fields["cone_basis"], fields["vertices"], fields["neighbours"],
        fields["counts"], params["pmf_threshold"], params["step_mm"] / voxel_sizes(affine),
        int(params["max_length_mm"] / params["step_mm"]),
        int(params["min_length_mm"] / params["step_mm"]), deterministic, random_seed)


def _tensor_seeds(seeds, affine, fields):
    """The seeds (voxel coordinates) that have a peak, and their starting directions:
    DIPY's ``generic_tracking`` pairing for one peak per voxel (nearest voxel,
    grid-clipped; peaks of value 0 dropped), vectorised."""
    inverse = np.linalg.inv(affine)
    voxels = np.dot(seeds, inverse[:3, :3].T)
    voxels += inverse[:3, 3]
    nearest = np.clip(np.round(voxels).astype(int), 0, np.array(fields["stop_map"].shape) - 1)
    at_seeds = tuple(nearest.T)
    valid = fields["peak_values"][at_seeds] > 0
    peaks = fields["peak_directions"][at_seeds][valid]
    with np.errstate(invalid="ignore", divide="ignore"):  # as DIPY: a zero peak gives NaN
        directions = peaks / np.linalg.norm(peaks, axis=1)[:, None]
    return np.ascontiguousarray(voxels[valid]), np.ascontiguousarray(directions)


def _track_chunk(seeds, method, fields, affine, params, random_seed):
    """One seed chunk through the tracker (single-threaded: the chunks are the parallelism).

    Returns the streamlines as one float32 (M, 3) array of world points and their
    lengths: that travels back from a worker far faster than thousands of small
    arrays (pickling each costs more than tracking it)."""
    if method in ("csd_prob", "csd_det"):
        return _track_chunk_in_cone(seeds, fields, affine, params, random_seed,
                                    deterministic=method == "csd_det")
    voxel_seeds, directions = _tensor_seeds(np.asarray(seeds, dtype=np.float64), affine, fields)
    peak_values = fields["peak_values"]
    return eudx.track_seeds(
        voxel_seeds, directions, np.asarray(affine, dtype=np.float64), peak_values.reshape(-1),
        fields["peak_directions"].reshape(-1, 3), fields["stop_map"].reshape(-1),
        np.array(peak_values.shape, dtype=np.int64), params["stop_threshold"],
        params["max_angle_deg"], eudx.MIN_TOTAL_WEIGHT, params["stop_threshold"],
        voxel_sizes(affine).astype(np.float64), params["step_mm"],
        int(params["max_length_mm"] / params["step_mm"]),
        int(params["min_length_mm"] / params["step_mm"]))


def _track_chunks(seeds, method, fields, affine, params, *, n_jobs, random_seed, dask_scheduler):
    """Fixed seed chunks, one random stream each (``random_seed + 1 + chunk index``), over
    ``n_jobs`` workers or a Dask cluster; the streamlines in seed order."""
    chunks = [seeds[i:i + SEED_CHUNK_SIZE] for i in range(0, len(seeds), SEED_CHUNK_SIZE)]
    with dask_backend(dask_scheduler, n_workers=n_jobs):
        # Both kernels (pipeline.tracking.eudx, pipeline.tracking.cone) release the GIL while
        # they track: threads share the arrays and cost nothing to start (measured on
        # 100k seeds, tensor: 2 threads 1.7-1.9x one; 2 processes no faster than one).
        results = parallel_map(_track_chunk, [
            (chunk, method, fields, affine, params, random_seed + 1 + i)
            for i, chunk in enumerate(chunks)], n_jobs=n_jobs, threads=True)
    return [s for points, lengths in results
            for s in np.split(points, np.cumsum(lengths)[:-1])] if results else []


def track_dti_deterministic(seeds, v1, fa, mask, affine, *, fa_stop=0.2, max_angle_deg=45.0,
                            step_mm=0.5, min_length_mm=20.0, max_length_mm=250.0,
                            n_jobs=1, random_seed=0, dask_scheduler=None):
    """Deterministic tensor tracking (EuDX on the principal eigenvector,
    :mod:`pipeline.tracking.eudx`), parallel over seed chunks.

    Parameters
    ----------
    seeds : ndarray (N, 3), world mm
    v1 : ndarray (X, Y, Z, 3), principal eigenvector in the voxel frame
    fa : ndarray (X, Y, Z)
    mask : bool ndarray (X, Y, Z)
    affine : ndarray (4, 4), voxel → world
    fa_stop : float ≥ 0
        Tracking stops where the interpolated FA falls to this; voxels of this FA or
        less do not steer it.
    max_angle_deg, step_mm, min_length_mm, max_length_mm : float
    n_jobs : int
        joblib worker threads. Chunks are fixed by :data:`SEED_CHUNK_SIZE`, so the
        streamlines are identical for any ``n_jobs``.
    random_seed : int
        Passed on per chunk as for :func:`track_csd`; this model draws nothing.
    dask_scheduler : str, optional
        Run the chunks on a Dask cluster instead: a scheduler address, or
        ``"slurm"`` for a dask-jobqueue SLURMCluster of ``n_jobs`` worker jobs
        (see :func:`pipeline.parallel.dask_backend`). Same streamlines.

    Returns
    -------
    list of float32 ndarray (n_points, 3), world mm, in seed order.
    """
    # Prepared once, here; the tracking threads share them.
    peak_values, peak_directions = tensor_peaks(v1, fa, mask)
    fields = {"stop_map": np.ascontiguousarray(fa, dtype=np.float64),
              "peak_values": peak_values, "peak_directions": peak_directions}
    params = dict(stop_threshold=fa_stop, max_angle_deg=max_angle_deg, step_mm=step_mm,
                  min_length_mm=min_length_mm, max_length_mm=max_length_mm)
    return _track_chunks(seeds, "dti_det", fields, affine, params, n_jobs=n_jobs,
                         random_seed=random_seed, dask_scheduler=dask_scheduler)


def track_csd(seeds, sh, fa, affine, *, direction="prob", fa_stop=0.2, pmf_threshold=0.1,
              max_angle_deg=45.0, step_mm=0.5, min_length_mm=20.0, max_length_mm=250.0,
              n_jobs=1, random_seed=0, dask_scheduler=None):
    """Tracking on CSD fibre ODFs, probabilistic or deterministic, parallel over seed chunks.

    Parameters
    ----------
    seeds : ndarray (N, 3), world mm
    sh : ndarray (X, Y, Z, n_coefficients)
        Fibre ODFs from :func:`pipeline.reconstruction.fodf.fit_csd`.
    fa : ndarray (X, Y, Z)
        Tracking stops where FA falls below ``fa_stop`` (as for the tensor, so the two
        models reach the same white matter).
    direction : {"prob", "det"}
        ``prob``: each step drawn from the ODF within ``max_angle_deg`` of the last;
        ``det``: the ODF maximum within that cone. DIPY's probabilistic and
        deterministic models, evaluated only inside the cone
        (:mod:`pipeline.tracking.cone`).
    pmf_threshold : float
        ODF values below this fraction are not followed.
    n_jobs, random_seed, dask_scheduler
        As in :func:`track_dti_deterministic`: each chunk has its own random stream,
        so probabilistic streamlines too are identical for any ``n_jobs``.

    Returns
    -------
    list of float32 ndarray (n_points, 3), world mm, in seed order.
    """
    if direction not in ("prob", "det"):
        raise ValueError(f"direction must be 'prob' or 'det', not {direction!r}")
    # Prepared once, here; the tracking threads share them.
    sh = np.ascontiguousarray(sh, dtype=np.float32)
    basis = cone.odf_basis(TRACKING_SPHERE, sh.shape[-1], fodf.SH_BASIS)
    neighbours, counts = cone.cone_neighbours(TRACKING_SPHERE.vertices, max_angle_deg)
    fields = {"stop_map": np.ascontiguousarray(fa, dtype=np.float64), "sh": sh, "basis": basis,
              "odf_max": cone.odf_maxima(sh, basis),
              "cone_basis": cone.cone_basis(basis, neighbours, counts),
              "vertices": np.ascontiguousarray(TRACKING_SPHERE.vertices, np.float64),
              "neighbours": neighbours, "counts": counts}
    params = dict(stop_threshold=fa_stop, pmf_threshold=pmf_threshold, step_mm=step_mm,
                  max_angle_deg=max_angle_deg, min_length_mm=min_length_mm,
                  max_length_mm=max_length_mm)
    return _track_chunks(seeds, f"csd_{direction}", fields, affine, params, n_jobs=n_jobs,
                         random_seed=random_seed, dask_scheduler=dask_scheduler)
