"""Tracking on fibre ODFs evaluated only inside the turning cone.

Same models as DIPY's probabilistic and deterministic trackers (``dipy.tracking.
tracker.probabilistic_tracking`` and ``deterministic_tracking``): the ODF, given
as spherical-harmonic coefficients, is interpolated trilinearly at the current
point, evaluated on a discrete sphere, values below ``pmf_threshold`` × its
maximum are dropped, and the next direction is, among the vertices within
``max_angle`` of the last one, drawn with probability ∝ the ODF (probabilistic)
or the ODF's maximum (deterministic). DIPY evaluates the ODF on the whole sphere
at every step and then discards what lies outside the cone; at 45° that is ~70 %
of the work. Here each vertex's cone (its neighbours within ``max_angle``, a
fixed list because every step lands exactly on a vertex) is computed once, and
only those vertices are evaluated, in single precision. The one number the full
sphere is still needed for, the ODF maximum of the threshold, is taken from a
per-voxel map of the maxima, interpolated like the coefficients (an upper bound
of the interpolated ODF's maximum, so the threshold is never lower than DIPY's).

Stepping, stopping and length rules are DIPY's: positions in voxel
coordinates, ``point += direction * step / voxel size``, tracking goes on while
the trilinearly interpolated stopping map exceeds its threshold (the point that
fails is not kept), at most ``max_points`` steps each way from the seed, the
streamline kept when it has ``min_points`` to ``max_points`` points. Each seed
starts along the ODF maximum at the seed and is tracked both ways, the backward
half along the reverse of the first step taken (DIPY: ``seeds_directions_pairs``
with one peak per seed).

The kernel is compiled by Numba (cached on disk after the first call) and uses
Numba's own random stream seeded per call, so a call's output depends only on
its arguments, never on which process runs it.
"""

import numpy as np
from dipy.reconst.shm import order_from_ncoef, sh_to_sf_matrix
from numba import njit

#: Voxels per block when the ODF maxima are computed (bounds the (block, vertices) matrix).
MAXIMA_BLOCK = 20000


def cone_neighbours(vertices, max_angle_deg):
    """For each vertex, the vertices within ``max_angle_deg`` of it or of its antipode.

    Returns
    -------
    neighbours : int32 (n_vertices, k_max), padded with -1
    counts : int32 (n_vertices,)
    """
    cos_similarity = np.cos(np.deg2rad(max_angle_deg))
    inside = np.abs(vertices @ vertices.T) >= cos_similarity
    counts = inside.sum(axis=1).astype(np.int32)
    neighbours = np.full((len(vertices), counts.max()), -1, dtype=np.int32)
    for v, row in enumerate(inside):
        members = np.flatnonzero(row)
        neighbours[v, :len(members)] = members
    return neighbours, counts


def odf_basis(sphere, n_coefficients, basis_type):
    """(n_vertices, n_coefficients) float32 matrix from SH coefficients to ODF values."""
    order = int(order_from_ncoef(n_coefficients))
    matrix = sh_to_sf_matrix(sphere, sh_order_max=order, basis_type=basis_type,
                             legacy=False, return_inv=False)
    return np.ascontiguousarray(matrix.T, dtype=np.float32)


def cone_basis(basis, neighbours, counts):
    """Per vertex, the basis rows of its cone transposed: float32 (n_vertices,
    n_coefficients, k_max), zero-padded, so the ODF over a cone is a sum of
    contiguous rows scaled by the coefficients."""
    blocks = np.zeros((len(neighbours), basis.shape[1], neighbours.shape[1]), dtype=np.float32)
    for v, (members, n) in enumerate(zip(neighbours, counts)):
        blocks[v, :, :n] = basis[members[:n]].T
    return blocks


def odf_maxima(sh, basis):
    """Per-voxel maximum of the ODF over the sphere, float32 of ``sh.shape[:3]``."""
    coefficients = np.asarray(sh, dtype=np.float32).reshape(-1, sh.shape[-1])
    maxima = np.zeros(len(coefficients), dtype=np.float32)
    nonzero = np.flatnonzero(np.any(coefficients != 0, axis=1))
    for start in range(0, len(nonzero), MAXIMA_BLOCK):
        block = nonzero[start:start + MAXIMA_BLOCK]
        maxima[block] = (coefficients[block] @ basis.T).max(axis=1)
    return maxima.reshape(sh.shape[:3])


@njit(cache=True, nogil=True)
def _axis_corners(x, size):
    """Lower and upper grid index and the upper one's weight along one axis (DIPY's
    clamping at the edges); lower index -1 when ``x`` is outside [-0.5, size - 0.5)."""
    if x < -0.5 or x >= size - 0.5:
        return -1, -1, 0.0
    floor = np.floor(x)
    return max(int(floor), 0), min(int(floor) + 1, size - 1), x - floor


@njit(cache=True, nogil=True)
def trilinear_corners(point, shape, flat_index, weight):
    """DIPY's trilinear scheme: the 8 corner voxels (flat indices) and weights of
    ``point`` (voxel coordinates); False outside [-0.5, shape - 0.5).

    Scalars only, no arrays: this runs at every step, and an allocation per step
    would cost more than the interpolation (and serialise threads on the allocator)."""
    i0, i1, fi = _axis_corners(point[0], shape[0])
    j0, j1, fj = _axis_corners(point[1], shape[1])
    k0, k1, fk = _axis_corners(point[2], shape[2])
    if i0 < 0 or j0 < 0 or k0 < 0:
        return False
    corner = 0
    for a in range(2):
        i = i1 if a else i0
        wa = fi if a else 1.0 - fi
        for b in range(2):
            j = j1 if b else j0
            wb = fj if b else 1.0 - fj
            for c in range(2):
                k = k1 if c else k0
                wc = fk if c else 1.0 - fk
                flat_index[corner] = (i * shape[1] + j) * shape[2] + k
                weight[corner] = wa * wb * wc
                corner += 1
    return True


@njit(cache=True, nogil=True, fastmath=True)
def _interpolate_coefficients(sh, flat_index, weight, out):
    out[:] = 0.0
    for corner in range(8):
        w = np.float32(weight[corner])
        index = flat_index[corner]
        for c in range(out.shape[0]):
            out[c] += w * sh[index, c]


@njit(cache=True, nogil=True)
def interpolate_scalar(values, flat_index, weight):
    """``values`` (flattened grid) at the point of :func:`trilinear_corners`."""
    value = 0.0
    for corner in range(8):
        value += weight[corner] * values[flat_index[corner]]
    return value


@njit(cache=True, nogil=True, fastmath=True)
def cone_odf(coefficients, vertex, cone_basis, counts, threshold, values):
    """ODF of ``coefficients`` on the cone of ``vertex`` (its :func:`cone_neighbours`,
    in that order) into ``values``, zero where below ``threshold`` or negative;
    returns the number of cone vertices."""
    n_cone = counts[vertex]
    values[:n_cone] = 0.0
    for c in range(coefficients.shape[0]):  # contiguous over the cone: vectorises
        weight_c = coefficients[c]
        for k in range(n_cone):
            values[k] += weight_c * cone_basis[vertex, c, k]
    for k in range(n_cone):
        if values[k] < threshold or values[k] < 0:
            values[k] = 0.0
    return n_cone


@njit(cache=True, nogil=True, fastmath=True)
def _walk(start, vertex, sign, out, sh, odf_max, stop_map, shape, stop_threshold,
          cone_basis, vertices, neighbours, counts, pmf_threshold, step_voxels, max_points,
          deterministic, scratch):
    """Track from ``start`` along ``sign * vertices[vertex]``; points into ``out``.

    Each step: the ODF maximum in the cone (``deterministic``), else a draw from the
    cone's ODF.

    Returns (number of points kept, vertex and sign of the first step kept, or -1, 0).
    """
    coefficients, values, cdf, flat_index, weight, point = scratch
    point[:] = start
    out[0] = point
    n_points = 1
    first_vertex, first_sign = -1, 0
    # The corners of the current point serve both its stopping test and its ODF.
    inside = trilinear_corners(point, shape, flat_index, weight)
    for _ in range(1, max_points):
        if not inside:
            break
        _interpolate_coefficients(sh, flat_index, weight, coefficients)
        threshold = pmf_threshold * interpolate_scalar(odf_max, flat_index, weight)
        n_cone = cone_odf(coefficients, vertex, cone_basis, counts, threshold, values)
        if deterministic:
            chosen = 0  # the first maximum in sphere order, as numpy's argmax in DIPY
            for k in range(1, n_cone):
                if values[k] > values[chosen]:
                    chosen = k
            if values[chosen] <= 0.0:
                break
        else:
            total = 0.0
            for k in range(n_cone):
                total += values[k]
                cdf[k] = total
            if total <= 0.0:
                break
            draw = np.random.random() * total
            chosen = 0
            while chosen < n_cone - 1 and cdf[chosen] <= draw:
                chosen += 1
        new_vertex = neighbours[vertex, chosen]
        alignment = 0.0
        for axis in range(3):
            alignment += vertices[vertex, axis] * vertices[new_vertex, axis]
        sign = sign if alignment > 0 else -sign
        vertex = new_vertex
        for axis in range(3):
            point[axis] += sign * vertices[vertex, axis] * step_voxels[axis]
        inside = trilinear_corners(point, shape, flat_index, weight)
        if not inside or interpolate_scalar(stop_map, flat_index, weight) <= stop_threshold:
            break
        if first_vertex < 0:
            first_vertex, first_sign = vertex, sign
        out[n_points] = point
        n_points += 1
    return n_points, first_vertex, first_sign


@njit(cache=True, nogil=True)
def to_world(voxel, affine, out):
    """Voxel coordinates (3,) to world (mm) into ``out`` by the (4, 4) ``affine``."""
    for axis in range(3):
        out[axis] = (affine[axis, 0] * voxel[0] + affine[axis, 1] * voxel[1]
                     + affine[axis, 2] * voxel[2] + affine[axis, 3])


@njit(cache=True, nogil=True)
def append_streamline(points, n_stored, backward, n_backward, forward, n_forward, affine):
    """Both halves of a streamline (voxel coordinates, each starting at the seed) as one,
    in world coordinates, after the ``n_stored`` points of ``points`` (float32, grown
    when full). Returns (points, n_stored)."""
    n_total = n_forward + n_backward - 1
    if n_stored + n_total > len(points):
        grown = np.empty((2 * len(points) + n_total, 3), np.float32)
        grown[:n_stored] = points[:n_stored]
        points = grown
    for i in range(n_backward - 1, 0, -1):  # backward half reversed, seed once
        to_world(backward[i], affine, points[n_stored])
        n_stored += 1
    for i in range(n_forward):
        to_world(forward[i], affine, points[n_stored])
        n_stored += 1
    return points, n_stored


@njit(cache=True, nogil=True)
def track_seeds(seeds, affine, sh, odf_max, stop_map, shape, stop_threshold, basis, cone_basis,
                vertices, neighbours, counts, pmf_threshold, step_voxels, max_points,
                min_points, deterministic, random_seed):
    """Streamlines from each seed, probabilistic or deterministic.

    Tracking runs in voxel coordinates; seeds and streamlines are in world
    coordinates (mm), mapped here rather than by numpy around the call, whose BLAS
    threads would compete with the tracking threads.

    Parameters
    ----------
    seeds : float64 (N, 3), world coordinates (mm)
    affine : float64 (4, 4), voxel to world of the grid
    sh : float32 (n_voxels, n_coefficients), the grid's coefficients, C order flattened
    odf_max : float32 (n_voxels,), :func:`odf_maxima` flattened
    stop_map : float64 (n_voxels,), flattened ; shape : int64 (3,)
    stop_threshold : float
    basis : float32 (n_vertices, n_coefficients), :func:`odf_basis`
    cone_basis : float32, :func:`cone_basis` of it
    vertices : float64 (n_vertices, 3) ; neighbours, counts : :func:`cone_neighbours`
    pmf_threshold : float, fraction of the ODF maximum
    step_voxels : float64 (3,), step size / voxel size per axis
    max_points, min_points : int, per streamline
    deterministic : bool, the ODF maximum in the cone at each step instead of a draw
    random_seed : int, seeds Numba's random stream for this call (probabilistic)

    Returns
    -------
    points : float32 (M, 3), world coordinates of all kept streamlines, in seed order
    lengths : int64 (K,), points per kept streamline
    """
    np.random.seed(random_seed)
    n_coefficients = basis.shape[1]
    # Scratch arrays made once per call: no allocation in the per-step code.
    scratch = (np.empty(n_coefficients, np.float32), np.empty(neighbours.shape[1], np.float32),
               np.empty(neighbours.shape[1]), np.empty(8, np.int64), np.empty(8), np.empty(3))
    coefficients, _, _, flat_index, weight, _ = scratch
    seed = np.empty(3)
    forward = np.empty((max_points, 3))
    backward = np.empty((max_points, 3))
    inverse = np.linalg.inv(affine)
    points = np.empty((max(len(seeds), 1) * 64, 3), np.float32)
    lengths = np.empty(len(seeds), np.int64)
    n_kept = 0
    n_stored = 0
    for s in range(len(seeds)):
        for axis in range(3):
            seed[axis] = (inverse[axis, 0] * seeds[s, 0] + inverse[axis, 1] * seeds[s, 1]
                          + inverse[axis, 2] * seeds[s, 2] + inverse[axis, 3])
        if not trilinear_corners(seed, shape, flat_index, weight):
            continue
        _interpolate_coefficients(sh, flat_index, weight, coefficients)
        best, best_value = -1, 0.0
        for v in range(basis.shape[0]):
            value = 0.0
            for c in range(n_coefficients):
                value += basis[v, c] * coefficients[c]
            if value > best_value:
                best, best_value = v, value
        if best < 0:
            continue
        n_forward, first_vertex, first_sign = _walk(
            seed, best, 1, forward, sh, odf_max, stop_map, shape, stop_threshold, cone_basis,
            vertices, neighbours, counts, pmf_threshold, step_voxels, max_points, deterministic,
            scratch)
        back_vertex, back_sign = (first_vertex, -first_sign) if first_vertex >= 0 else (best, -1)
        n_backward, _, _ = _walk(
            seed, back_vertex, back_sign, backward, sh, odf_max, stop_map, shape,
            stop_threshold, cone_basis, vertices, neighbours, counts, pmf_threshold, step_voxels,
            max_points, deterministic, scratch)
        n_total = n_forward + n_backward - 1
        if n_total < min_points or n_total > max_points:
            continue
        points, n_stored = append_streamline(points, n_stored, backward, n_backward, forward,
                                             n_forward, affine)
        lengths[n_kept] = n_total
        n_kept += 1
    return points[:n_stored].copy(), lengths[:n_kept].copy()
