"""EuDX on the tensor's principal direction, compiled.

The model is DIPY's EuDX as ``dipy.tracking.tracker.eudx_tracking`` runs it with
one peak per voxel (Garyfallidis 2012, PhD thesis; DIPY 1.12 ``eudx_propagator``):
at each point, every one of the 8 surrounding voxels (corners at ``floor(point)``
and ``floor(point) + 1``, trilinear weights; corners outside the grid skipped)
whose peak value exceeds ``peak_threshold`` and whose direction lies within
``max_angle`` of the current one (either sign) votes with its direction, signed
to agree with the current one, weighted by its trilinear weight; tracking stops
when the voting weight falls below ``min_total_weight`` (DIPY: 0.5), else the
next direction is the normalised weighted sum. Stepping, stopping and length
rules are DIPY's generic tracker's: ``point += direction / voxel size * step``
in voxel coordinates; tracking goes on while the stopping map, interpolated by
DIPY's clamped trilinear scheme (:func:`pipeline.tracking.cone.trilinear_corners`),
exceeds its threshold (the point that fails is not kept); at most ``max_points``
steps each way; the backward half starts along the reverse of the first step
taken; a streamline is kept when it has ``min_points`` to ``max_points`` points.

The same arithmetic in the same order as DIPY's Cython, so the streamlines are
DIPY's bit for bit (tests/test_tracking_units.py). What differs is around it:
DIPY yields each streamline as its own Python array and maps it to world
coordinates with numpy one by one; here the whole chunk is tracked, mapped and
returned as one array (20k seeds on sub-philips01, one thread: DIPY 0.47 s,
this 0.16 s, the same 5503 streamlines).
"""

import numpy as np
from numba import njit

from .cone import append_streamline, interpolate_scalar, trilinear_corners

#: Trilinear weight of the voting voxels below which tracking ends (DIPY's
#: ``eudx_tracking``: 0.5, i.e. at least half the neighbourhood agrees).
MIN_TOTAL_WEIGHT = 0.5
#: DIPY's corner order of EuDX's trilinear neighbourhood (``_trilinear_interpolation_iso``):
#: the weights are summed in this order, so keeping it keeps DIPY's rounding.
CORNER_OFFSETS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                           [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.int64)


@njit(cache=True, nogil=True)
def _normalise(vector):
    """``vector`` scaled to unit length in place, as DIPY (× 1/norm); False if its norm is 0."""
    norm = np.sqrt(vector[0] * vector[0] + vector[1] * vector[1] + vector[2] * vector[2])
    if norm == 0:
        return False
    scale = 1.0 / norm
    for axis in range(3):
        vector[axis] = vector[axis] * scale
    return True


@njit(cache=True, nogil=True)
def _next_direction(point, direction, peak_values, peak_directions, shape, peak_threshold,
                    cos_max_angle, min_total_weight, vote):
    """EuDX's direction at ``point`` (voxel coordinates) into ``direction`` (the current
    one on entry); False where tracking ends. ``vote``: (3,) scratch."""
    if not _normalise(direction):
        return False
    # Scalars, no arrays: this runs at every step, where an allocation would cost more
    # than the step (and serialise threads on the allocator).
    floor_i, floor_j, floor_k = np.floor(point[0]), np.floor(point[1]), np.floor(point[2])
    fraction_i, fraction_j, fraction_k = point[0] - floor_i, point[1] - floor_j, point[2] - floor_k
    total_weight = 0.0
    vote[:] = 0.0
    for m in range(8):
        i = int(floor_i) + CORNER_OFFSETS[m, 0]
        j = int(floor_j) + CORNER_OFFSETS[m, 1]
        k = int(floor_k) + CORNER_OFFSETS[m, 2]
        if i < 0 or i >= shape[0] or j < 0 or j >= shape[1] or k < 0 or k >= shape[2]:
            continue
        flat = (i * shape[1] + j) * shape[2] + k
        if peak_values[flat] <= peak_threshold:
            continue
        dot = (direction[0] * peak_directions[flat, 0] + direction[1] * peak_directions[flat, 1]
               + direction[2] * peak_directions[flat, 2])
        closeness = -dot if dot < 0 else dot
        if not closeness > 0.0:  # DIPY's best match starts at 0 (and NaN never beats it)
            closeness = 0.0
        if closeness < cos_max_angle:
            continue
        weight = ((fraction_i if CORNER_OFFSETS[m, 0] else 1.0 - fraction_i)
                  * (fraction_j if CORNER_OFFSETS[m, 1] else 1.0 - fraction_j)
                  * (fraction_k if CORNER_OFFSETS[m, 2] else 1.0 - fraction_k))
        total_weight += weight
        for axis in range(3):
            peak = -peak_directions[flat, axis] if dot < 0 else peak_directions[flat, axis]
            vote[axis] += weight * peak
    if total_weight < min_total_weight or not _normalise(vote):
        return False
    direction[:] = vote
    return True


@njit(cache=True, nogil=True)
def _walk(start, start_direction, out, peak_values, peak_directions, stop_map, shape,
          peak_threshold, cos_max_angle, min_total_weight, stop_threshold, inverse_voxel_size,
          step_mm, max_points, scratch):
    """Track from ``start`` along ``start_direction``; points into ``out``; returns how many
    (the start included)."""
    point, direction, vote, flat_index, weight = scratch
    point[:] = start
    direction[:] = start_direction
    out[0] = point
    # DIPY's loop index after its loop: the step that ended it, or the last one when
    # none did (whose point is then not kept either).
    end = max_points - 1 if max_points > 1 else 1
    for i in range(1, max_points):
        if not _next_direction(point, direction, peak_values, peak_directions, shape,
                               peak_threshold, cos_max_angle, min_total_weight, vote):
            end = i
            break
        for axis in range(3):
            point[axis] += direction[axis] * inverse_voxel_size[axis] * step_mm
        out[i] = point
        if (not trilinear_corners(point, shape, flat_index, weight)
                or interpolate_scalar(stop_map, flat_index, weight) <= stop_threshold):
            end = i
            break
    return end


@njit(cache=True, nogil=True)
def track_seeds(seeds, seed_directions, affine, peak_values, peak_directions, stop_map, shape,
                peak_threshold, max_angle_deg, min_total_weight, stop_threshold, voxel_size,
                step_mm, max_points, min_points):
    """EuDX streamlines from each seed, both ways.

    Parameters
    ----------
    seeds : float64 (N, 3), voxel coordinates
    seed_directions : float64 (N, 3), unit vectors, voxel frame (DIPY leaves a seed whose
        direction's norm is outside [0.99, 1.01] at its seed point)
    affine : float64 (4, 4), voxel to world of the grid
    peak_values : float64 (n_voxels,), the peak's value (FA), C order flattened
    peak_directions : float64 (n_voxels, 3), the peak's direction (voxel frame)
    stop_map : float64 (n_voxels,), flattened ; shape : int64 (3,)
    peak_threshold : float ≥ 0, peaks of this value or less do not vote
    max_angle_deg : float, largest turn per step (degrees)
    min_total_weight : float, trilinear weight of the votes below which tracking ends
    stop_threshold : float, tracking goes on where the stopping map exceeds it
    voxel_size : float64 (3,), mm ; step_mm : float
    max_points, min_points : int, per streamline

    Returns
    -------
    points : float32 (M, 3), world coordinates (mm) of all kept streamlines, in seed order
    lengths : int64 (K,), points per kept streamline
    """
    cos_max_angle = np.cos((np.pi * max_angle_deg) / 180.0)
    inverse_voxel_size = 1.0 / voxel_size
    scratch = (np.empty(3), np.empty(3), np.empty(3), np.empty(8, np.int64), np.empty(8))
    backward_direction = np.empty(3)
    forward = np.empty((max(max_points, 1), 3))
    backward = np.empty((max(max_points, 1), 3))
    points = np.empty((max(len(seeds), 1) * 64, 3), np.float32)
    lengths = np.empty(len(seeds), np.int64)
    n_kept = 0
    n_stored = 0
    for s in range(len(seeds)):
        seed = seeds[s]
        norm = np.sqrt(seed_directions[s, 0] ** 2 + seed_directions[s, 1] ** 2
                       + seed_directions[s, 2] ** 2)
        if norm < 0.99 or norm > 1.01:
            n_forward, n_backward = 1, 1
            forward[0] = seed
        else:
            n_forward = _walk(seed, seed_directions[s], forward, peak_values, peak_directions,
                              stop_map, shape, peak_threshold, cos_max_angle, min_total_weight,
                              stop_threshold, inverse_voxel_size, step_mm, max_points, scratch)
            if n_forward > 1:  # along the first step taken, as DIPY
                for axis in range(3):
                    backward_direction[axis] = forward[1, axis] - forward[0, axis]
                _normalise(backward_direction)
            else:
                backward_direction[:] = seed_directions[s]
            for axis in range(3):
                backward_direction[axis] = -backward_direction[axis]
            n_backward = _walk(seed, backward_direction, backward, peak_values, peak_directions,
                               stop_map, shape, peak_threshold, cos_max_angle, min_total_weight,
                               stop_threshold, inverse_voxel_size, step_mm, max_points, scratch)
        n_total = n_forward + n_backward - 1
        if n_total < min_points or n_total > max_points:
            continue
        points, n_stored = append_streamline(points, n_stored, backward, n_backward, forward,
                                             n_forward, affine)
        lengths[n_kept] = n_total
        n_kept += 1
    return points[:n_stored].copy(), lengths[:n_kept].copy()
