"""Figures of the anatomy: the CSTs on FA slices, on colour FA, and in a glass brain."""

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from ..cst import SIDES, TRACT_NAMES
from ..io.dwi import voxel_directions_to_world
from .drawing import COLORS, PEAK_COLOR, new_figure
from .inputs import image_volume
from .slicing import (
    PLANES,
    all_points,
    bare_axes,
    display_step,
    draw_slice,
    finish_panel_figure,
    mark_peak,
    orientation_labels,
    panel_extent,
    project_points,
    sample_world_slice,
    style_panel,
    voxel_step,
    world_bbox,
)


def plot_tract_slices(fa_img, streamlines, *, center, peak=None, slab_mm=4.0,
                      planes=("axial", "coronal", "sagittal"), sagittal_x=None,
                      bbox=None, max_points=30000, title=None) -> Figure:
    """FA slices through ``center`` (world RAS mm) with both CSTs overlaid.

    Parameters
    ----------
    fa_img : nibabel image or None (then a black background)
    streamlines : dict side → sequence of (n, 3) arrays in world RAS mm
    center : (3,) world mm; the axial plane is at ``center[2]``, coronal at
        ``center[1]``, sagittal at ``center[0]`` (or ``sagittal_x`` if given)
    peak : (3,) world mm or None; drawn as a red ring
    slab_mm : streamline points within ± this distance of a plane are drawn
    planes : which panels, in order
    bbox : (3, 2) world-mm display box (default: non-zero FA plus the tracts)

    Notes
    -----
    Each panel's data coordinates are world millimetres (horizontal: x for
    axial/coronal, y for sagittal), increasing to the right: neurological
    convention, subject left on the image left.  ``fig.axes[i]`` is the panel
    for ``planes[i]``.
    """
    center = np.asarray(center, dtype=float)
    points = {side: all_points(streamlines.get(side, [])) for side in SIDES}
    fa_data = image_volume(fa_img) if fa_img is not None else None
    if bbox is None:
        bbox = slices_bbox(fa_img, fa_data, points, peak=peak, center=center)
        if fa_img is None:  # no brain to frame the tracts: show at least a brain-sized box
            mid, half = bbox.mean(axis=1), np.maximum((bbox[:, 1] - bbox[:, 0]) / 2, 70.0)
            bbox = np.stack([mid - half, mid + half], axis=1)
    bbox = np.asarray(bbox, dtype=float)
    step = min(voxel_step(fa_img) if fa_img is not None else 1.0, 2.0)
    step = max(step, display_step(bbox))

    widths = []
    for plane in planes:
        h_axis, v_axis, _ = PLANES[plane]
        widths.append((bbox[h_axis, 1] - bbox[h_axis, 0] + 8) /
                      max(bbox[v_axis, 1] - bbox[v_axis, 0] + 8, 1))
    fig = new_figure(max(3.2 * sum(widths), 3.5) + 0.4, 3.8)
    fig.set_facecolor("white")
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    rng = np.random.default_rng(0)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        _, _, f_axis = PLANES[plane]
        position = float(center[f_axis])
        if plane == "sagittal" and sagittal_x is not None:
            position = float(sagittal_x)
        extent = panel_extent(bbox, plane)
        draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
        for side in SIDES:
            xy = project_points(points[side], plane, position, slab_mm)
            if len(xy) > max_points:
                xy = xy[rng.choice(len(xy), max_points, replace=False)]
            if len(xy):
                ax.scatter(xy[:, 0], xy[:, 1], s=2.0, c=COLORS[side], alpha=0.55,
                           linewidths=0, zorder=4, rasterized=True)
        mark_peak(ax, plane, peak)
        style_panel(ax, plane, position, extent)
    handles = [Line2D([], [], marker="o", linestyle="", color=COLORS[s], markersize=7,
                      label=f"{TRACT_NAMES[s]} ({s})") for s in SIDES]
    if peak is not None:
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                              markeredgecolor=PEAK_COLOR, markeredgewidth=2, markersize=9,
                              label="peak"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, -0.01))
    fig.text(0.5, 0.965 if title else 0.985,
             "Neurological convention: subject left on image left", ha="center",
             va="top", fontsize=8, color="#555")
    if title:
        fig.suptitle(title, fontsize=11, y=1.04)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.10)
    return fig


def world_abs_directions(v1_img):
    """|principal direction| in the world RAS frame, (X, Y, Z, 3) float32 on the V1 grid.

    The V1 image holds unit vectors in the voxel-axis frame (DIPY's convention);
    :func:`pipeline.io.dwi.voxel_directions_to_world` maps them to world RAS+ with the
    affine's normalised linear part, so red = left-right, green = anterior-posterior
    and blue = inferior-superior whatever the storage orientation.  The absolute
    value removes the sign ambiguity of an eigenvector (and so can be interpolated).
    """
    vectors = np.nan_to_num(np.asarray(v1_img.dataobj, dtype=np.float32))
    world = voxel_directions_to_world(vectors, np.asarray(v1_img.affine, dtype=float))
    return np.abs(world).astype(np.float32)


def color_fa_slice(fa_img, fa_data, v1_img, v1_world, plane, position, extent, step):
    """RGB (n_v, n_h, 3) colour-FA slice: |principal direction in world axes| × FA."""
    fa = np.clip(sample_world_slice(fa_img, plane, position, extent, step=step, data=fa_data),
                 0.0, 1.0)
    rgb = np.stack([sample_world_slice(v1_img, plane, position, extent, step=step,
                                       data=v1_world[..., c]) for c in range(3)], axis=-1)
    norm = np.linalg.norm(rgb, axis=-1, keepdims=True)
    rgb = np.divide(rgb, norm, out=np.zeros_like(rgb), where=norm > 1e-6)
    return np.clip(rgb * fa[..., None], 0.0, 1.0)


def _tract_outline(ax, xy, extent, step, color, *, linestyle="-"):
    """Outline (contour of the smoothed occupancy) of projected points, haloed in white."""
    from matplotlib import patheffects

    if len(xy) < 3:
        return
    h_edges = np.arange(extent[0], extent[1] + step, step)
    v_edges = np.arange(extent[2], extent[3] + step, step)
    counts, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=[h_edges, v_edges])
    occupancy = ndimage.gaussian_filter((counts.T > 0).astype(float), 1.0)
    if occupancy.max() <= 0.2:
        return
    hs = (h_edges[:-1] + h_edges[1:]) / 2
    vs = (v_edges[:-1] + v_edges[1:]) / 2
    cs = ax.contour(hs, vs, occupancy, levels=[0.2], colors=[color], linewidths=1.6,
                    linestyles=linestyle, zorder=5)
    halo = [patheffects.withStroke(linewidth=3.4, foreground="white")]
    try:
        cs.set(path_effects=halo)
    except Exception:  # noqa: BLE001 - older matplotlib: per-collection effects
        for coll in getattr(cs, "collections", []):
            coll.set_path_effects(halo)


def slices_bbox(fa_img, fa_data, points, *, peak=None, center=None):
    """(3, 2) world mm box holding the brain (FA > 0.02), the tracts' points and the peak
    (120 mm around ``center`` when there is none of them)."""
    boxes = []
    if fa_img is not None:
        boxes.append(world_bbox(fa_img, fa_data, threshold=0.02))
    for pts in points.values():
        if len(pts):
            boxes.append(np.stack([pts.min(axis=0), pts.max(axis=0)], axis=1))
    if peak is not None:
        boxes.append(np.stack([np.asarray(peak, float)] * 2, axis=1))
    if not boxes and center is not None:
        boxes.append(np.stack([np.asarray(center, float) - 60,
                               np.asarray(center, float) + 60], axis=1))
    boxes = np.stack(boxes)
    return np.stack([boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)], axis=1)


def plot_color_fa(fa_img, v1_img, streamlines, *, center, sagittal_x=None, slab_mm=4.0,
                  planes=("axial", "coronal", "sagittal"), bbox=None) -> Figure:
    """Directionally encoded colour FA with both CSTs outlined.

    RGB = |V1 in the world frame| × FA (red: left-right, green: anterior-posterior,
    blue: inferior-superior), sampled on world-aligned planes like
    :func:`plot_tract_slices`; neurological convention.  Each CST is drawn as the
    outline of its streamline points within ± ``slab_mm`` of the plane (CST_L solid,
    CST_R dashed) so that the colour underneath stays visible.
    """
    if fa_img is None or v1_img is None:
        raise ValueError("colour FA needs both the FA and the V1 image")
    center = np.asarray(center, dtype=float)
    fa_data = image_volume(fa_img)
    v1_world = world_abs_directions(v1_img)
    points = {side: all_points(streamlines.get(side, [])) for side in SIDES}
    if bbox is None:
        bbox = slices_bbox(fa_img, fa_data, points, center=center)
    bbox = np.asarray(bbox, dtype=float)
    step = max(min(voxel_step(fa_img), 2.0), display_step(bbox))
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = new_figure(max(3.2 * sum(widths), 3.5) + 0.4, 3.8)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        position = float(center[PLANES[plane][2]])
        if plane == "sagittal" and sagittal_x is not None:
            position = float(sagittal_x)
        extent = panel_extent(bbox, plane)
        rgb = color_fa_slice(fa_img, fa_data, v1_img, v1_world, plane, position, extent, step)
        ax.imshow(rgb, origin="lower", extent=extent, interpolation="bilinear",
                  aspect="equal")
        for side, style in zip(SIDES, ("-", "--")):
            xy = project_points(points[side], plane, position, slab_mm)
            _tract_outline(ax, xy, extent, step, COLORS[side], linestyle=style)
        style_panel(ax, plane, position, extent)
    handles = [Line2D([], [], color=COLORS[s], lw=2, ls=ls, label=f"{TRACT_NAMES[s]} ({s})")
               for s, ls in zip(SIDES, ("-", "--"))]
    handles += [Patch(color=c, label=t) for c, t in (("#e41a1c", "left-right"),
                                                     ("#33cc33", "anterior-posterior"),
                                                     ("#3355ff", "inferior-superior"))]
    finish_panel_figure(fig, handles, legend_fontsize=8.5)
    return fig


def _silhouette_points(mask_img, fa_img):
    """World coordinates of the brain voxels (mask, else FA > 0.02); None if none."""
    for img, threshold in ((mask_img, 0.0), (fa_img, 0.02)):
        if img is None:
            continue
        ijk = np.argwhere(image_volume(img) > threshold)
        if len(ijk):
            if len(ijk) > 600_000:  # keep it fast on 1 mm masks; the outline is unchanged
                ijk = ijk[np.random.default_rng(0).choice(len(ijk), 600_000, replace=False)]
            return nib.affines.apply_affine(img.affine, ijk), voxel_step(img)
    return None, None


#: Glass-brain panels: (plane, sides drawn, title).  Both CSTs project onto the same
#: place of a sagittal view, so each gets its own sagittal panel.
GLASS_PANELS = (("sagittal", ("left",), "Sagittal, CST_L"),
                ("coronal", SIDES, "Coronal"),
                ("axial", SIDES, "Axial"),
                ("sagittal", ("right",), "Sagittal, CST_R"))


def plot_glass_brain(streamlines, *, mask_img=None, fa_img=None, panels=GLASS_PANELS,
                     max_points=400_000) -> Figure:
    """Glass-brain projections of both CSTs over a faint brain outline.

    Streamline points are projected (track density summed along the viewing axis,
    log scale, like a maximum-intensity projection) onto sagittal, coronal and axial
    planes; ``panels`` lists (plane, sides, title).  The brain silhouette is the
    projection of the brain mask (or of FA > 0.02).  World RAS mm, neurological
    convention (subject left on the image left; anterior on the right of sagittal
    views).  ``fig.axes[i]`` is ``panels[i]``.
    """
    planes = [p[0] for p in panels]
    points = {side: all_points(streamlines.get(side, [])) for side in SIDES}
    rng = np.random.default_rng(0)
    for side in SIDES:
        if len(points[side]) > max_points:
            points[side] = points[side][rng.choice(len(points[side]), max_points,
                                                   replace=False)]
    brain, brain_step = _silhouette_points(mask_img, fa_img)
    boxes = [np.stack([p.min(axis=0), p.max(axis=0)], axis=1) for p in points.values()
             if len(p)]
    if brain is not None:
        boxes.append(np.stack([brain.min(axis=0), brain.max(axis=0)], axis=1))
    if not boxes:
        raise ValueError("no streamlines and no brain mask to project")
    boxes = np.stack(boxes)
    bbox = np.stack([boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)], axis=1)
    if brain is None:  # frame the tracts in a brain-sized box
        mid, half = bbox.mean(axis=1), np.maximum((bbox[:, 1] - bbox[:, 0]) / 2, 70.0)
        bbox = np.stack([mid - half, mid + half], axis=1)
    step = max(brain_step or 1.0, display_step(bbox, 300))
    fine = max(1.0, display_step(bbox, 400))  # track density grid
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = new_figure(max(2.6 * sum(widths), 3.5) + 0.4, 3.3)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.05)
    from matplotlib.colors import to_rgb

    for i, (plane, sides, title) in enumerate(panels):
        h_axis, v_axis, f_axis = PLANES[plane]
        ax = fig.add_subplot(gs[0, i])
        extent = panel_extent(bbox, plane)
        h_edges = np.arange(extent[0], extent[1] + step, step)
        v_edges = np.arange(extent[2], extent[3] + step, step)
        img_extent = (h_edges[0], h_edges[-1], v_edges[0], v_edges[-1])
        if brain is not None:
            counts, _, _ = np.histogram2d(brain[:, h_axis], brain[:, v_axis],
                                          bins=[h_edges, v_edges])
            sil = ndimage.binary_fill_holes(ndimage.binary_closing(counts.T > 0, iterations=2))
            ax.imshow(np.where(sil, 0.93, 1.0), cmap="gray", vmin=0, vmax=1, origin="lower",
                      extent=img_extent, interpolation="bilinear", aspect="equal")
            if sil.any() and not sil.all():
                hs = (h_edges[:-1] + h_edges[1:]) / 2
                vs = (v_edges[:-1] + v_edges[1:]) / 2
                ax.contour(hs, vs, ndimage.gaussian_filter(sil.astype(float), 0.8),
                           levels=[0.5], colors=["#8c8c8c"], linewidths=1.0)
        t_edges_h = np.arange(extent[0], extent[1] + fine, fine)
        t_edges_v = np.arange(extent[2], extent[3] + fine, fine)
        for side in sides:
            pts = points.get(side)
            if pts is None or not len(pts):
                continue
            counts, _, _ = np.histogram2d(pts[:, h_axis], pts[:, v_axis],
                                          bins=[t_edges_h, t_edges_v])
            density = np.log1p(counts.T) / np.log1p(counts.max())
            rgba = np.zeros(density.shape + (4,))
            rgba[..., :3] = to_rgb(COLORS[side])
            rgba[..., 3] = np.where(counts.T > 0, 0.2 + 0.75 * density, 0.0)
            ax.imshow(rgba, origin="lower", interpolation="bilinear", aspect="equal",
                      extent=(t_edges_h[0], t_edges_h[-1], t_edges_v[0], t_edges_v[-1]),
                      zorder=3)
        bare_axes(ax, extent)
        ax.set_title(title, fontsize=10)
        orientation_labels(ax, plane, color="#333")
    handles = [Patch(color=COLORS[s], label=f"{TRACT_NAMES[s]} ({s})") for s in SIDES]
    if brain is not None:
        handles.append(Patch(facecolor="#ededed", edgecolor="#8c8c8c", label="brain outline"))
    finish_panel_figure(fig, handles, legend_fontsize=9)
    return fig
