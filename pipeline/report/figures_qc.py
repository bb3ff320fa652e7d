"""Quality-control figures: brain mask, CST ROIs, registration, motion, gradient check."""

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from .drawing import PEAK_COLOR, ROI_LABELS, SEGMENT_COLOR, new_figure
from .inputs import image_volume
from .slicing import (
    AXIS_NAME,
    PLANES,
    centroid_world,
    display_step,
    draw_slice,
    panel_extent,
    sample_world_slice,
    style_panel,
    voxel_step,
    world_bbox,
)
from .values import fmt_mm


def plot_mask_overlay(fa_img, mask_img, *, planes=("axial", "coronal", "sagittal")) -> Figure:
    """Brain-mask outline (red) on world-aligned FA slices through the mask centroid."""
    mask = image_volume(mask_img) > 0
    center = centroid_world(mask_img, mask.astype(np.float32))
    if center is None:
        center = nib.affines.apply_affine(mask_img.affine, np.array(mask_img.shape[:3]) / 2)
    bbox = world_bbox(mask_img)
    if fa_img is not None:
        fa_box = world_bbox(fa_img, image_volume(fa_img), 0.02)
        bbox = np.stack([np.minimum(bbox[:, 0], fa_box[:, 0]),
                         np.maximum(bbox[:, 1], fa_box[:, 1])], axis=1)
    step = max(min(voxel_step(mask_img), 2.0), display_step(bbox))
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = new_figure(max(3.0 * sum(widths), 3.5), 3.4)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    fa_data = image_volume(fa_img) if fa_img is not None else None
    mask_f = mask.astype(np.float32)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        position = float(center[PLANES[plane][2]])
        extent = panel_extent(bbox, plane)
        draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
        m = sample_world_slice(mask_img, plane, position, extent, step=step, order=0,
                               data=mask_f)
        if m.any() and not m.all():
            hs = np.linspace(extent[0], extent[1], m.shape[1])
            vs = np.linspace(extent[2], extent[3], m.shape[0])
            ax.contour(hs, vs, m, levels=[0.5], colors=[PEAK_COLOR], linewidths=1.2)
        style_panel(ax, plane, position, extent)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02)
    return fig


_ROI_COLORS = {1: "#e41a1c", 2: "#ff7f00", 3: "#4daf4a", 4: "#984ea3", 5: "#377eb8",
               6: "#a65628", 7: "#f781bf", 8: "#ffff33"}


def plot_roi_overlay(fa_img, rois_img) -> Figure:
    """CST ROI labels on axial FA slices, one panel per ROI pair (through their centroid)."""
    from matplotlib.colors import ListedColormap

    labels = np.rint(image_volume(rois_img)).astype(np.int16)
    pairs = (("motor", 1, 2), ("PLIC", 3, 4), ("peduncle", 5, 6), ("pons", 7, 8))
    panels = []
    for name, left, right in pairs:
        present = [v for v in (left, right) if (labels == v).any()]
        if present:
            centers = [centroid_world(rois_img, labels, v) for v in present]
            panels.append((name, float(np.mean([c[2] for c in centers]))))
    if not panels:
        raise ValueError("the ROI image holds none of the labels 1–8")
    bbox = world_bbox(rois_img)
    fa_data = image_volume(fa_img) if fa_img is not None else None
    if fa_img is not None:
        bbox = world_bbox(fa_img, fa_data, 0.02)
    step = max(min(voxel_step(rois_img), 2.0), display_step(bbox))
    cmap = ListedColormap([_ROI_COLORS[k] for k in range(1, 9)])
    fig = new_figure(2.6 * len(panels), 3.5)
    for i, (name, z) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        extent = panel_extent(bbox, "axial")
        draw_slice(ax, fa_img, "axial", z, extent, step=step, data=fa_data)
        lab = sample_world_slice(rois_img, "axial", z, extent, step=step, order=0,
                                 data=labels.astype(np.float32))
        shown = np.ma.masked_where((lab < 1) | (lab > 8), lab)
        ax.imshow(shown, cmap=cmap, vmin=0.5, vmax=8.5, origin="lower", extent=extent,
                  interpolation="nearest", alpha=0.75, aspect="equal")
        style_panel(ax, "axial", z, extent)
        ax.set_title(f"{name}: z = {fmt_mm(z)} mm", fontsize=9)
    handles = [Patch(color=_ROI_COLORS[k], label=v) for k, v in ROI_LABELS.items()
               if (labels == k).any()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7.5,
               frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.04)
    return fig


def _is_label_image(data):
    sample = data[:: max(1, data.shape[0] // 32), :: max(1, data.shape[1] // 32),
                  :: max(1, data.shape[2] // 32)]
    values = np.unique(sample[np.isfinite(sample)])
    return values.size <= 2 and np.all(np.isin(values, (0, 1)))


def plot_registration(fa_img, template_img, *, n_slices=4) -> Figure:
    """Subject FA with the outline of the template warped to the subject (registration QC).

    ``template_img`` is the template brain mask (outline at 0.5) or the template FA
    (white-matter outline at 40 % of its 99th percentile) resampled on the subject
    grid.  Rows: axial, coronal, sagittal; ``n_slices`` world-aligned slices each,
    evenly spread over the brain.  Neurological convention.
    """
    if fa_img is None:
        raise ValueError("registration QC needs the FA image")
    fa_data = image_volume(fa_img)
    tpl = np.nan_to_num(image_volume(template_img))
    if _is_label_image(tpl):
        level, what = 0.5, "template brain mask"
    else:
        positive = tpl[tpl > 0]
        level = 0.4 * float(np.percentile(positive, 99)) if positive.size else 0.5
        what = "template FA (white matter)"
    bbox = world_bbox(fa_img, fa_data, 0.02)
    step = max(min(voxel_step(fa_img), 2.0), display_step(bbox, 250))
    planes = ("axial", "coronal", "sagittal")
    heights = [(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8)
               / max(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8, 1) for p in planes]
    panel_w = 2.3
    fig = new_figure(panel_w * n_slices + 0.2, panel_w * sum(heights) + 1.3)
    gs = fig.add_gridspec(len(planes), n_slices, height_ratios=heights, wspace=0.03,
                          hspace=0.16)
    fractions = np.linspace(0.22, 0.78, n_slices)
    for row, plane in enumerate(planes):
        f_axis = PLANES[plane][2]
        for col, frac in enumerate(fractions):
            position = float(bbox[f_axis, 0] + frac * (bbox[f_axis, 1] - bbox[f_axis, 0]))
            ax = fig.add_subplot(gs[row, col])
            extent = panel_extent(bbox, plane)
            draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
            t = sample_world_slice(template_img, plane, position, extent, step=step,
                                   data=tpl.astype(np.float32))
            if what != "template brain mask":
                t = ndimage.gaussian_filter(t, 0.6)
            if t.min() < level < t.max():
                hs = np.linspace(extent[0], extent[1], t.shape[1])
                vs = np.linspace(extent[2], extent[3], t.shape[0])
                ax.contour(hs, vs, t, levels=[level], colors=["#ff3b30"], linewidths=0.9)
            style_panel(ax, plane, position, extent)
            ax.set_title(f"{plane[:3]}. {AXIS_NAME[f_axis]} = {fmt_mm(position)} mm",
                         fontsize=8)
            for text in ax.texts:
                text.set_fontsize(8)
    fig.legend(handles=[Line2D([], [], color="#ff3b30", lw=1.5,
                               label=f"{what}, warped to the subject")],
               loc="lower center", frameon=False, fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.06)
    return fig


def plot_motion(motion, outlier_volumes=()) -> Figure:
    """Per-volume translation, rotation and framewise displacement, outliers marked."""
    translation = np.asarray(motion["translation_mm"], dtype=float)
    rotation = np.asarray(motion["rotation_deg"], dtype=float)
    fd = np.asarray(motion["framewise_displacement_mm"], dtype=float)
    volumes = np.arange(len(fd))
    fig = new_figure(9.0, 5.4)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, values, ylabel in ((axes[0], translation, "translation (mm)"),
                               (axes[1], rotation, "rotation (°)")):
        for column, (axis, color) in enumerate(zip("xyz", ("#D55E00", "#009E73", "#0072B2"))):
            ax.plot(volumes, values[:, column], marker=".", color=color, label=axis)
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.legend(loc="upper right", fontsize=7, ncol=3, frameon=False)
    axes[2].bar(volumes, fd, color="0.45", width=0.8)
    axes[2].set_ylabel("FD (mm)")
    axes[2].set_xlabel("volume")
    for ax in axes:
        for volume in outlier_volumes:
            ax.axvspan(volume - 0.5, volume + 0.5, color=SEGMENT_COLOR, alpha=0.2, lw=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gradient_check(candidates, chosen=None, *, shown=8) -> Figure:
    """Fibre-coherence score of the gradient table as given and its best alternatives."""
    ranked = sorted(candidates.items(), key=lambda item: -item[1])
    given = next(((k, v) for k, v in ranked if k == "as given"), None)
    top = ranked[:shown]
    if given is not None and given not in top:
        top[-1] = given
    labels = [k for k, _ in top][::-1]
    scores = [v for _, v in top][::-1]
    colors = ["#D7191C" if k == chosen else "#0072B2" if k == "as given" else "0.65"
              for k in labels]
    fig = new_figure(7.5, 0.32 * len(labels) + 1.0)
    ax = fig.subplots()
    ax.barh(range(len(labels)), scores, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("mean streamline length (mm) — higher: more coherent fibres")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
