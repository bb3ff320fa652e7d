"""World-space slicing and projection, and the panel layout of the slice figures.

Everything spatial is done in world RAS+ millimetres: image slices are resampled on a
world-aligned grid through the inverse affine, so the figures are correct whatever the
storage orientation of the image (LAS, RAS, oblique).  Slices are shown in the
neurological convention: the subject's left is on the left of the image.
"""

import nibabel as nib
import numpy as np
from scipy import ndimage

from .drawing import PEAK_COLOR
from .inputs import image_volume
from .values import fmt_mm

#: Axes of each display plane: (horizontal world axis, vertical world axis, fixed axis).
#: Horizontal axes increase to the right, so the subject's left (-x) is on the image
#: left (neurological convention) and anterior (+y) is on the right of sagittal views.
PLANES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
#: Name of each world axis, and its negative and positive direction letters.
AXIS_NAME = "xyz"
_ORIENT = {0: ("L", "R"), 1: ("P", "A"), 2: ("I", "S")}


def world_bbox(img, data=None, threshold=0.0):
    """(3, 2) world RAS mm bounding box of voxels above ``threshold`` (whole grid if none)."""
    shape = np.array(img.shape[:3])
    lo, hi = np.zeros(3), shape - 1.0
    if data is not None:
        nz = data > threshold
        if nz.any():
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                idx = np.nonzero(nz.any(axis=other))[0]
                lo[axis], hi[axis] = idx[0], idx[-1]
    corners = np.array([[i, j, k] for i in (lo[0], hi[0]) for j in (lo[1], hi[1])
                        for k in (lo[2], hi[2])])
    world = nib.affines.apply_affine(img.affine, corners)
    return np.stack([world.min(axis=0), world.max(axis=0)], axis=1)


def sample_world_slice(img, plane, position, extent, *, step=1.0, order=1, data=None):
    """Resample a 3D image on a world-aligned plane.

    Parameters
    ----------
    img : nibabel image (any storage orientation, possibly oblique)
    plane : 'axial' | 'coronal' | 'sagittal'
    position : float, world mm of the fixed axis (z, y or x)
    extent : (h_min, h_max, v_min, v_max) world mm of the horizontal and vertical
        display axes (x,y for axial; x,z coronal; y,z sagittal)
    step : grid spacing in mm
    order : interpolation order (0 for labels)
    data : optional 3D array to sample instead of the image's data (same grid)

    Returns
    -------
    ndarray (n_vertical, n_horizontal); row 0 at ``v_min`` and column 0 at
    ``h_min`` (draw with ``origin='lower'`` and ``extent``).  Outside the image: 0.
    """
    h_axis, v_axis, f_axis = PLANES[plane]
    h_min, h_max, v_min, v_max = extent
    hs = np.arange(h_min, h_max + step / 2, step)
    vs = np.arange(v_min, v_max + step / 2, step)
    hh, vv = np.meshgrid(hs, vs)  # (n_v, n_h)
    world = np.zeros((hh.size, 3))
    world[:, h_axis] = hh.ravel()
    world[:, v_axis] = vv.ravel()
    world[:, f_axis] = position
    voxel = nib.affines.apply_affine(np.linalg.inv(img.affine), world).T
    volume = image_volume(img) if data is None else data
    values = ndimage.map_coordinates(volume, voxel, order=order, mode="constant", cval=0.0,
                                     prefilter=False)
    return values.reshape(hh.shape)


def all_points(streamlines):
    """All points of ``streamlines`` as one (n, 3) float32 array (world mm)."""
    if streamlines is None or len(streamlines) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    if isinstance(streamlines, nib.streamlines.ArraySequence):
        return np.asarray(streamlines.get_data(), dtype=np.float32).reshape(-1, 3)
    return np.concatenate([np.asarray(s, dtype=np.float32).reshape(-1, 3)
                           for s in streamlines], axis=0)


def project_points(points, plane, position, slab_mm):
    """Points within ±``slab_mm`` of the plane → (n, 2) display coordinates (world mm).

    Horizontal coordinate first; for axial/coronal it is world x, so the subject's
    left (negative x) lies on the left of the display (neurological convention).
    """
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    h_axis, v_axis, f_axis = PLANES[plane]
    keep = np.abs(points[:, f_axis] - position) <= slab_mm
    return points[keep][:, [h_axis, v_axis]]


def display_step(bbox, max_pixels=400):
    """Grid spacing (mm, ≥ 1) that keeps the longest side of ``bbox`` within ``max_pixels``."""
    span = float(np.max(bbox[:, 1] - bbox[:, 0]))
    return max(1.0, span / max_pixels)


def voxel_step(img):
    """Grid spacing (mm) of the image's finest voxel side, within 0.5–2 mm."""
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    return float(np.clip(zooms.min(), 0.5, 2.0))


def orientation_labels(ax, plane, color="white"):
    """Letters of the world directions (L/R, P/A, I/S) at the four edges of a panel."""
    h_axis, v_axis, _ = PLANES[plane]
    style = dict(color=color, fontsize=11, fontweight="bold", transform=ax.transAxes,
                 ha="center", va="center")
    ax.text(0.035, 0.5, _ORIENT[h_axis][0], **style)
    ax.text(0.965, 0.5, _ORIENT[h_axis][1], **style)
    ax.text(0.5, 0.04, _ORIENT[v_axis][0], **style)
    ax.text(0.5, 0.96, _ORIENT[v_axis][1], **style)


def panel_extent(bbox, plane, margin=4.0):
    """(h0, h1, v0, v1) display extent (mm) of ``bbox`` in ``plane``, with a margin."""
    h_axis, v_axis, _ = PLANES[plane]
    return (bbox[h_axis, 0] - margin, bbox[h_axis, 1] + margin,
            bbox[v_axis, 0] - margin, bbox[v_axis, 1] + margin)


def draw_slice(ax, img, plane, position, extent, *, step, data=None, cmap="gray",
                vmin=0.0, vmax=1.0):
    if img is None:
        ax.set_facecolor("black")
        ax.text(0.5, 0.13, "no FA image", transform=ax.transAxes, ha="center", color="#bbb",
                fontsize=8)
        return None
    slab = sample_world_slice(img, plane, position, extent, step=step, data=data)
    ax.imshow(slab, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", extent=extent,
              interpolation="bilinear", aspect="equal")
    return slab


def bare_axes(ax, extent):
    """Axes limited to ``extent`` (h0, h1, v0, v1) in mm, without ticks or frame."""
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def finish_panel_figure(fig, handles, *, legend_fontsize):
    """Legend below, the display convention above, and the shared panel layout."""
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=legend_fontsize, bbox_to_anchor=(0.5, -0.01))
    fig.text(0.5, 0.985, "Neurological convention: subject left on image left", ha="center",
             va="top", fontsize=8, color="#555")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.10)


def style_panel(ax, plane, position, extent):
    """Black, frameless panel titled with its plane and position, with orientation letters."""
    h_axis, v_axis, f_axis = PLANES[plane]
    bare_axes(ax, extent)
    ax.set_facecolor("black")
    ax.set_title(f"{plane.capitalize()}  {AXIS_NAME[f_axis]} = {fmt_mm(position)} mm",
                 fontsize=10)
    orientation_labels(ax, plane)


def mark_peak(ax, plane, peak):
    """A red ring and cross on the asymmetry peak (nothing when there is none)."""
    if peak is None:
        return
    h_axis, v_axis, _ = PLANES[plane]
    ax.plot([peak[h_axis]], [peak[v_axis]], marker="o", markersize=13, markerfacecolor="none",
            markeredgecolor=PEAK_COLOR, markeredgewidth=2.0, zorder=6)
    ax.plot([peak[h_axis]], [peak[v_axis]], marker="+", markersize=8, color=PEAK_COLOR,
            markeredgewidth=1.5, zorder=6)


def centroid_world(img, data, value=None):
    """World position (mm) of the centre of ``data`` > 0 (or == ``value``); None if empty."""
    mask = data > 0 if value is None else data == value
    if not mask.any():
        return None
    ijk = np.array(ndimage.center_of_mass(mask))
    return nib.affines.apply_affine(img.affine, ijk)
