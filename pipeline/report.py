"""One self-contained HTML report of a CST integrity run (research use only).

Plain functions, no Nipype.  Figures are drawn with matplotlib's Agg canvas
(no pyplot, so no global backend state is touched) and embedded as base64 PNG
data URIs; the CSS is inline; the page needs no JavaScript, no network and no
external font.

Everything spatial is done in world RAS+ millimetres: image slices are
resampled on a world-aligned grid through the inverse affine, so the figures
are correct whatever the storage orientation of the FA image (LAS, RAS,
oblique).  Slices are shown in the neurological convention: the subject's
left is on the left of the image.

Public functions
----------------
write_report(out_html, *, metrics, profiles_tsv, fa_file, tract_files, mask_file=None,
             rois_file=None, v1_file=None, template_in_subject_file=None, n_jobs=1) -> Path
plot_tract_slices(fa_img, streamlines, *, center, peak=None, ...) -> Figure
plot_profiles(profiles, *, metric="fa", segments=(), peak_node=None, ...) -> Figure
plot_asymmetry_profile(ai, *, threshold=None, se=None, segments=(), ...) -> Figure
plot_diffusivity_profiles(profiles, *, metrics=("md", "rd", "ad"), ...) -> Figure
plot_mask_overlay(fa_img, mask_img, ...) -> Figure
plot_roi_overlay(fa_img, rois_img, ...) -> Figure
plot_color_fa(fa_img, v1_img, streamlines, *, center, ...) -> Figure
plot_glass_brain(streamlines, *, mask_img=None, fa_img=None, ...) -> Figure
plot_registration(fa_img, template_img, ...) -> Figure
methods_text(metrics) -> str
figure_to_data_uri(fig) -> str
sample_world_slice(img, plane, position, extent, *, step=1.0, order=1) -> ndarray
read_profiles_tsv(path) -> dict
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import multiprocessing
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from . import __version__, prognosis
from .dwi import voxel_directions_to_world
from .localization import BOUNDARY_MARGIN_MM, LEVELS
from .outputs import write_text
from .prognosis import DISCLAIMER
from .tractometry import SIDES, TRACT_NAMES
from .uncertainty import N_BOOTSTRAP

LOGGER = logging.getLogger(__name__)

#: Tract colours (Okabe-Ito, colour-blind safe); both stand out from a grey FA map.
COLORS = {"left": "#E69F00", "right": "#0072B2"}
PEAK_COLOR = "#D7191C"
SEGMENT_COLOR = "#D7191C"

LEVEL_COLORS = {"medulla": "#c6dbef", "pons": "#c7e9c0", "cerebral_peduncle": "#fdd0a2",
                "internal_capsule": "#dadaeb", "corona_radiata": "#fff2ae",
                "cortex": "#d9d9d9"}
LEVEL_SHORT = {"medulla": "medulla", "pons": "pons", "cerebral_peduncle": "peduncle",
               "internal_capsule": "int. capsule", "corona_radiata": "corona rad.",
               "cortex": "cortex"}

ROI_LABELS = {1: "motor_L", 2: "motor_R", 3: "plic_L", 4: "plic_R", 5: "peduncle_L",
              6: "peduncle_R", 7: "pons_L", 8: "pons_R"}

#: Axes of each display plane: (horizontal world axis, vertical world axis, fixed axis).
#: Horizontal axes increase to the right, so the subject's left (-x) is on the image
#: left (neurological convention) and anterior (+y) is on the right of sagittal views.
PLANES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
_AXIS_NAME = "xyz"
_ORIENT = {0: ("L", "R"), 1: ("P", "A"), 2: ("I", "S")}

REFERENCES = {
    "garyfallidis2014": ("Garyfallidis E, Brett M, Amirbekian B, et al. Dipy, a library for the "
                         "analysis of diffusion MRI data. Front Neuroinform 2014;8:8. "
                         "doi:10.3389/fninf.2014.00008"),
    "veraart2016": ("Veraart J, Novikov DS, Christiaens D, Ades-Aron B, Sijbers J, Fieremans E. "
                    "Denoising of diffusion MRI using random matrix theory. NeuroImage "
                    "2016;142:394–406. doi:10.1016/j.neuroimage.2016.08.016"),
    "avants2008": ("Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image "
                   "registration with cross-correlation: evaluating automated labeling of "
                   "elderly and neurodegenerative brain. Med Image Anal 2008;12:26–41. "
                   "doi:10.1016/j.media.2007.06.004"),
    "yeatman2012": ("Yeatman JD, Dougherty RF, Myall NJ, Wandell BA, Feldman HM. Tract profiles "
                    "of white matter properties: automating fiber-tract quantification. PLoS One "
                    "2012;7:e49790. doi:10.1371/journal.pone.0049790"),
    "kellner2016": ("Kellner E, Dhital B, Kiselev VG, Reisert M. Gibbs-ringing artifact removal "
                    "based on local subvoxel-shifts. Magn Reson Med 2016;76:1574–1581. "
                    "doi:10.1002/mrm.26054"),
    "jeurissen2014": ("Jeurissen B, Leemans A, Sijbers J. Automated correction of improperly "
                      "rotated diffusion gradient orientations in diffusion weighted MRI. Med "
                      "Image Anal 2014;18:953–962. doi:10.1016/j.media.2014.05.012"),
    "jeurissen2014msmt": ("Jeurissen B, Tournier JD, Dhollander T, Connelly A, Sijbers J. "
                          "Multi-tissue constrained spherical deconvolution for improved "
                          "analysis of multi-shell diffusion MRI data. NeuroImage "
                          "2014;103:411–426. doi:10.1016/j.neuroimage.2014.07.061"),
    "leemans2009": ("Leemans A, Jones DK. The B-matrix must be rotated when correcting for "
                    "subject motion in DTI data. Magn Reson Med 2009;61:1336–1349. "
                    "doi:10.1002/mrm.21890"),
    "power2012": ("Power JD, Barnes KA, Snyder AZ, Schlaggar BL, Petersen SE. Spurious but "
                  "systematic correlations in functional connectivity MRI networks arise from "
                  "subject motion. NeuroImage 2012;59:2142–2154. "
                  "doi:10.1016/j.neuroimage.2011.10.018"),
    "whitcher2008": ("Whitcher B, Tuch DS, Wisco JJ, Sorensen AG, Wang L. Using the wild "
                     "bootstrap to quantify uncertainty in diffusion tensor imaging. Hum Brain "
                     "Mapp 2008;29:346–362. doi:10.1002/hbm.20395"),
    "stinear2007": prognosis.REFERENCES["stinear2007"],
    "stinear2012": prognosis.REFERENCES["stinear2012"],
}

_DPI = 110


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

def _esc(value) -> str:
    """HTML-escape anything (``None`` → empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _get(mapping, *keys, default=None):
    """Nested ``dict.get`` that tolerates missing levels and non-dict values."""
    current = mapping
    for key in keys:
        if not isinstance(current, dict) or key not in current:
            return default
        current = current[key]
    return default if current is None else current


def _num(value):
    """float, or NaN for None / 'n/a' / anything not a number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _fmt_num(value, digits=3) -> str:
    value = _num(value)
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.{digits}g}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _fmt_mm(value) -> str:
    value = _num(value)
    if not math.isfinite(value):
        return "?"
    value = round(value, 1)
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _fmt_value(value) -> str:
    """Human string for a table cell (numbers compact, lists joined)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _fmt_num(value, 4)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float, str, bool, type(None), np.generic)) for v in value):
            shown = ", ".join(_fmt_value(v) for v in value[:12])
            return f"[{shown}{', …' if len(value) > 12 else ''}]" + (
                f" ({len(value)} values)" if len(value) > 12 else "")
        return json.dumps(value, default=str)[:400]
    return str(value)


def _flatten(obj, prefix="") -> list[tuple[str, object]]:
    """Nested dict → [(dotted key, leaf value)]."""
    rows = []
    if isinstance(obj, dict):
        if not obj and prefix:
            rows.append((prefix, "{}"))
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                rows.extend(_flatten(value, name))
            else:
                rows.append((name, value))
    else:
        rows.append((prefix or "value", obj))
    return rows


def _kv_table(rows, *, headers=("Key", "Value"), css="kv") -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt_value(v))}</td></tr>"
                   for k, v in rows)
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_ACRONYMS = {"umn": "UMN", "lmn": "LMN", "plic": "PLIC", "prep": "PREP", "cst": "CST",
             "fa": "FA", "mep": "MEP", "qc": "QC"}


def _humanise(text) -> str:
    """'umn_damage_plic_asymmetry' → 'UMN damage PLIC asymmetry'."""
    words = ("" if text is None else str(text)).replace("_", " ").split()
    words = [_ACRONYMS.get(w.lower(), w) for w in words]
    if words and words[0] == words[0].lower():
        words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words)


def _new_figure(width, height) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_to_data_uri(fig, *, dpi=_DPI) -> str:
    """Render a matplotlib Figure (Agg) to a ``data:image/png;base64,…`` URI."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor(),
                bbox_inches="tight", pad_inches=0.08)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------
# Loading inputs (never raise: return None plus a note)
# --------------------------------------------------------------------------------------

def _load_image(path, what, notes):
    if path is None:
        notes.append(f"No {what} was given.")
        return None
    path = Path(path)
    if not path.exists():
        notes.append(f"The {what} file is missing: {path.name}.")
        return None
    try:
        img = nib.load(str(path))
        if len(img.shape) < 3:
            raise ValueError(f"expected a 3D image, got shape {img.shape}")
        return img
    except Exception as exc:  # noqa: BLE001 - report must render regardless
        notes.append(f"The {what} file could not be read ({path.name}: {exc}).")
        return None


def _volume(img, dtype=np.float32):
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    return np.asarray(data, dtype=dtype)


def _load_tracts(tract_files, notes):
    """{side: list of (n, 3) float arrays in world RAS mm}, and {side: count or None}."""
    tract_files = tract_files or {}
    streamlines, counts = {}, {}
    for side in SIDES:
        name = TRACT_NAMES[side]
        path = next((tract_files[k] for k in (side, name, side[0].upper()) if k in tract_files),
                    None)
        streamlines[side], counts[side] = [], None
        if path is None:
            notes.append(f"No {side} tract file ({name}) was given.")
            continue
        path = Path(path)
        if not path.exists():
            notes.append(f"The {side} tract file ({name}) is missing: {path.name}.")
            continue
        try:
            # ``.streamlines`` are in world RAS mm (nibabel applies the file's affine).
            streamlines[side] = nib.streamlines.load(str(path)).streamlines
            counts[side] = len(streamlines[side])
        except Exception as exc:  # noqa: BLE001
            notes.append(f"The {side} tract file ({name}) could not be read "
                         f"({path.name}: {exc}).")
            continue
        if counts[side] == 0:
            notes.append(f"The {side} tract ({name}) has 0 streamlines.")
    return streamlines, counts


def read_profiles_tsv(path) -> dict:
    """Read the profiles TSV.

    Returns
    -------
    dict side → dict with ``node`` (int array), ``fa, md, rd, ad, x, y, z`` (float
    arrays, NaN where 'n/a') and ``level`` (list of str or None), sorted by node.
    Sides absent from the file are absent from the dict.
    """
    by_tract = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            by_tract.setdefault((row.get("tract") or "").strip(), []).append(row)
    profiles = {}
    for side in SIDES:
        rows = by_tract.get(TRACT_NAMES[side])
        if not rows:
            continue
        rows.sort(key=lambda r: int(_num(r.get("node")) if math.isfinite(_num(r.get("node")))
                                    else 0))
        prof = {"node": np.array([int(_num(r.get("node")) if math.isfinite(_num(r.get("node")))
                                      else i) for i, r in enumerate(rows)])}
        for column in ("fa", "md", "rd", "ad", "x", "y", "z"):
            prof[column] = np.array([_num(r.get(column)) for r in rows], dtype=float)
        levels = []
        for r in rows:
            level = (r.get("level") or "").strip()
            levels.append(None if level in ("", "n/a", "None", "nan") else level)
        prof["level"] = levels
        profiles[side] = prof
    return profiles


# --------------------------------------------------------------------------------------
# World-space geometry
# --------------------------------------------------------------------------------------

def _world_bbox(img, data=None, threshold=0.0):
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
    volume = _volume(img) if data is None else data
    values = ndimage.map_coordinates(volume, voxel, order=order, mode="constant", cval=0.0,
                                     prefilter=False)
    return values.reshape(hh.shape)


def _all_points(streamlines):
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


def _display_step(bbox, max_pixels=400):
    span = float(np.max(bbox[:, 1] - bbox[:, 0]))
    return max(1.0, span / max_pixels)


def _voxel_step(img):
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    return float(np.clip(zooms.min(), 0.5, 2.0))


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

def _orientation_labels(ax, plane, color="white"):
    h_axis, v_axis, _ = PLANES[plane]
    style = dict(color=color, fontsize=11, fontweight="bold", transform=ax.transAxes,
                 ha="center", va="center")
    ax.text(0.035, 0.5, _ORIENT[h_axis][0], **style)
    ax.text(0.965, 0.5, _ORIENT[h_axis][1], **style)
    ax.text(0.5, 0.04, _ORIENT[v_axis][0], **style)
    ax.text(0.5, 0.96, _ORIENT[v_axis][1], **style)


def _panel_extent(bbox, plane, margin=4.0):
    h_axis, v_axis, _ = PLANES[plane]
    return (bbox[h_axis, 0] - margin, bbox[h_axis, 1] + margin,
            bbox[v_axis, 0] - margin, bbox[v_axis, 1] + margin)


def _draw_slice(ax, img, plane, position, extent, *, step, data=None, cmap="gray",
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


def _bare_axes(ax, extent):
    """Axes limited to ``extent`` (h0, h1, v0, v1) in mm, without ticks or frame."""
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _finish_panel_figure(fig, handles, *, legend_fontsize):
    """Legend below, the display convention above, and the shared panel layout."""
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=legend_fontsize, bbox_to_anchor=(0.5, -0.01))
    fig.text(0.5, 0.985, "Neurological convention: subject left on image left", ha="center",
             va="top", fontsize=8, color="#555")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.10)


def _style_panel(ax, plane, position, extent):
    h_axis, v_axis, f_axis = PLANES[plane]
    _bare_axes(ax, extent)
    ax.set_facecolor("black")
    ax.set_title(f"{plane.capitalize()}  {_AXIS_NAME[f_axis]} = {_fmt_mm(position)} mm",
                 fontsize=10)
    _orientation_labels(ax, plane)


def _mark_peak(ax, plane, peak):
    if peak is None:
        return
    h_axis, v_axis, _ = PLANES[plane]
    ax.plot([peak[h_axis]], [peak[v_axis]], marker="o", markersize=13, markerfacecolor="none",
            markeredgecolor=PEAK_COLOR, markeredgewidth=2.0, zorder=6)
    ax.plot([peak[h_axis]], [peak[v_axis]], marker="+", markersize=8, color=PEAK_COLOR,
            markeredgewidth=1.5, zorder=6)


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
    points = {side: _all_points(streamlines.get(side, [])) for side in SIDES}
    fa_data = _volume(fa_img) if fa_img is not None else None
    if bbox is None:
        bbox = _slices_bbox(fa_img, fa_data, points, peak=peak, center=center)
        if fa_img is None:  # no brain to frame the tracts: show at least a brain-sized box
            mid, half = bbox.mean(axis=1), np.maximum((bbox[:, 1] - bbox[:, 0]) / 2, 70.0)
            bbox = np.stack([mid - half, mid + half], axis=1)
    bbox = np.asarray(bbox, dtype=float)
    step = min(_voxel_step(fa_img) if fa_img is not None else 1.0, 2.0)
    step = max(step, _display_step(bbox))

    widths = []
    for plane in planes:
        h_axis, v_axis, _ = PLANES[plane]
        widths.append((bbox[h_axis, 1] - bbox[h_axis, 0] + 8) /
                      max(bbox[v_axis, 1] - bbox[v_axis, 0] + 8, 1))
    fig = _new_figure(max(3.2 * sum(widths), 3.5) + 0.4, 3.8)
    fig.set_facecolor("white")
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    rng = np.random.default_rng(0)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        _, _, f_axis = PLANES[plane]
        position = float(center[f_axis])
        if plane == "sagittal" and sagittal_x is not None:
            position = float(sagittal_x)
        extent = _panel_extent(bbox, plane)
        _draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
        for side in SIDES:
            xy = project_points(points[side], plane, position, slab_mm)
            if len(xy) > max_points:
                xy = xy[rng.choice(len(xy), max_points, replace=False)]
            if len(xy):
                ax.scatter(xy[:, 0], xy[:, 1], s=2.0, c=COLORS[side], alpha=0.55,
                           linewidths=0, zorder=4, rasterized=True)
        _mark_peak(ax, plane, peak)
        _style_panel(ax, plane, position, extent)
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


def _level_runs(levels):
    """[(level, first node, last node)] runs of equal level (None kept as a run)."""
    runs = []
    for i, level in enumerate(levels):
        if runs and runs[-1][0] == level:
            runs[-1][2] = i
        else:
            runs.append([level, i, i])
    return [tuple(r) for r in runs]


def _shade_levels(ax, levels, nodes, *, alpha=0.35, annotate=True):
    if not levels:
        return
    for level, first, last in _level_runs(levels):
        if level is None:
            continue
        x0, x1 = nodes[first] - 0.5, nodes[last] + 0.5
        ax.axvspan(x0, x1, color=LEVEL_COLORS.get(level, "#eeeeee"), alpha=alpha, lw=0,
                   zorder=0)
        if annotate:
            width = x1 - x0
            label = LEVEL_SHORT.get(level, str(level).replace("_", " "))
            rotate = width < 9
            ax.text((x0 + x1) / 2, 0.985, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7, color="#333",
                    rotation=90 if rotate else 0, clip_on=True)


def _shade_segments(ax, segments, *, label=True):
    used = False
    for seg in segments or ():
        start, end = _num(seg.get("start_node")), _num(seg.get("end_node"))
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        ax.axvspan(start - 0.5, end + 0.5, facecolor=SEGMENT_COLOR, alpha=0.13,
                   edgecolor=SEGMENT_COLOR, hatch="///", lw=0.0, zorder=1,
                   label="detected segment" if (label and not used) else None)
        used = True
    return used


def _band_levels(profiles):
    """Per-node level names for the background bands: left tract's, filled from the right."""
    left = (profiles.get("left") or {}).get("level")
    right = (profiles.get("right") or {}).get("level")
    if left is None and right is None:
        return None
    n = max(len(left or []), len(right or []))
    out = []
    for i in range(n):
        value = left[i] if left is not None and i < len(left) else None
        if value is None and right is not None and i < len(right):
            value = right[i]
        out.append(value)
    return out


def _node_axis(ax):
    ax.set_xlabel("Node (0 = inferior, brainstem  →  99 = superior, cortex)", fontsize=9)
    ax.grid(True, axis="y", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def plot_profiles(profiles, *, metric="fa", segments=(), peak_node=None, ylabel=None,
                  title=None) -> Figure:
    """Left vs right profile of one metric along the nodes, level bands and segments shaded.

    ``profiles`` is :func:`read_profiles_tsv`'s dict (side → columns).
    """
    fig = _new_figure(8.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    levels = _band_levels(profiles)
    n_nodes = 100
    for side in SIDES:
        prof = profiles.get(side)
        if prof is None or metric not in prof:
            continue
        values = np.asarray(prof[metric], dtype=float)
        n_nodes = max(n_nodes, len(values))
        ax.plot(prof["node"], values, color=COLORS[side], lw=2.0,
                label=f"{TRACT_NAMES[side]} ({side})")
    nodes = np.arange(n_nodes)
    if levels:
        _shade_levels(ax, levels, nodes)
    _shade_segments(ax, segments)
    if peak_node is not None and math.isfinite(_num(peak_node)):
        ax.axvline(_num(peak_node), color=PEAK_COLOR, lw=1.2, ls="--", label="peak node")
    ax.set_xlim(-0.5, n_nodes - 0.5)
    ax.set_ylabel(ylabel or metric.upper())
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + (hi - lo) * 0.18)  # room for level names
    _node_axis(ax)
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _shade_ignored_ends(ax, n_nodes, end_nodes):
    """Grey the ``end_nodes`` nodes at each end that detection leaves out; True if drawn."""
    count = _num(end_nodes)
    if not math.isfinite(count) or count < 1 or n_nodes < 1:
        return False
    count = min(int(count), n_nodes)
    for x0, x1 in ((-0.5, count - 0.5), (n_nodes - count - 0.5, n_nodes - 0.5)):
        ax.axvspan(x0, x1, facecolor="#9a9a9a", alpha=0.35, edgecolor="#666666", hatch="..",
                   lw=0.0, zorder=0.5,
                   label=f"not used by detection ({count} end nodes)" if x0 < 0 else None)
    return True


def _detection_method(thresholds) -> str:
    """The rule the run's detection used, from the metrics' ``localization.thresholds``:
    ``"calibrated"`` or ``"fixed-ai"`` (also when no ``method`` is recorded, as in runs
    made before there was a choice)."""
    method = thresholds.get("method") if isinstance(thresholds, dict) else None
    return method or "fixed-ai"


def _ignored_end_nodes(thresholds):
    """Nodes at each end that the run's detection left out, from the metrics'
    ``localization.thresholds``: ``end_nodes`` under the fixed-AI rule; None under a rule
    that uses every node (``calibrated``)."""
    if not isinstance(thresholds, dict) or _detection_method(thresholds) != "fixed-ai":
        return None
    return thresholds.get("end_nodes")


def plot_asymmetry_profile(ai, *, threshold=None, se=None, segments=(), levels=None,
                           peak_node=None, end_nodes=None, title=None) -> Figure:
    """FA asymmetry index AI = (L − R)/(L + R) along the nodes.

    Parameters
    ----------
    ai : sequence of float
        AI per node (None or 'n/a' where unknown).
    threshold : float, optional
        |AI| detection threshold of the fixed-AI rule, drawn at ± its value.
    se : sequence of float, optional
        Bootstrap standard error of AI per node (``asymmetry.fa_ai_profile_se`` of
        the metrics), drawn as a band of ± 2 SE around the profile.
    segments : sequence of dict
        Detected segments (``start_node``, ``end_node``), hatched.
    levels : list of str or None, optional
        Level name per node, for the background bands.
    peak_node : int, optional
        Node of the finding's peak, a dotted line.
    end_nodes : int, optional
        Nodes at each end that detection ignores (``localization.thresholds.end_nodes``
        under the fixed-AI rule), greyed.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ai = np.array([_num(v) for v in ai], dtype=float)
    nodes = np.arange(len(ai))
    fig = _new_figure(8.6, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    if levels:
        _shade_levels(ax, levels, nodes)
    _shade_ignored_ends(ax, len(ai), end_nodes)
    _shade_segments(ax, segments)
    ax.axhline(0, color="#555", lw=0.8)
    finite = np.isfinite(ai)
    limit = np.nanmax(np.abs(ai)) if finite.any() else 0.1
    if se is not None:
        band = 2 * np.array([_num(v) for v in se], dtype=float)[:len(ai)]
        band = np.concatenate([band, np.full(len(ai) - len(band), np.nan)])
        shown = finite & np.isfinite(band)
        if shown.any():
            ax.fill_between(nodes, ai - band, ai + band, where=shown, facecolor="#8c8c8c",
                            alpha=0.2, edgecolor="#6e6e6e", lw=0.6, zorder=1.5,
                            label="± 2 SE (bootstrap)")
            limit = max(limit, float(np.max(np.abs(ai[shown]) + band[shown])))
    ax.plot(nodes, ai, color="#333", lw=2.0, label="FA AI")
    ax.fill_between(nodes, 0, ai, where=finite & (ai > 0), color=COLORS["left"], alpha=0.25,
                    lw=0, label="left FA higher")
    ax.fill_between(nodes, 0, ai, where=finite & (ai < 0), color=COLORS["right"], alpha=0.25,
                    lw=0, label="right FA higher")
    thr = _num(threshold)
    if math.isfinite(thr):
        ax.axhline(thr, color=PEAK_COLOR, lw=1.0, ls="--", label=f"± threshold ({thr:g})")
        ax.axhline(-thr, color=PEAK_COLOR, lw=1.0, ls="--")
        limit = max(limit, thr)
    if peak_node is not None and math.isfinite(_num(peak_node)):
        ax.axvline(_num(peak_node), color=PEAK_COLOR, lw=1.2, ls=":", label="peak node")
    limit = max(limit * 1.35, 0.05)
    ax.set_ylim(-limit, limit)
    ax.set_xlim(-0.5, max(len(ai), 1) - 0.5)
    ax.set_ylabel("AI = (L − R) / (L + R)")
    ax.text(1.005, 0.97, "left FA\nhigher", transform=ax.transAxes, fontsize=7, va="top",
            color="#555")
    ax.text(1.005, 0.03, "right FA\nhigher", transform=ax.transAxes, fontsize=7,
            va="bottom", color="#555")
    _node_axis(ax)
    # Below the axes: inside, the legend hid the profile where a finding dips.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7.5, ncol=4,
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


_DIFF_LABELS = {"md": "MD", "rd": "RD", "ad": "AD", "fa": "FA"}


def plot_diffusivity_profiles(profiles, *, metrics=("md", "rd", "ad"), segments=(),
                              title=None) -> Figure:
    """Small multiples of left vs right diffusivity profiles (MD, RD, AD)."""
    fig = _new_figure(3.0 * len(metrics) + 0.6, 3.0)
    levels = _band_levels(profiles)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        values = {s: np.asarray(profiles[s][metric], float) for s in SIDES
                  if s in profiles and metric in profiles[s]}
        finite = [v[np.isfinite(v)] for v in values.values()]
        finite = np.concatenate(finite) if finite else np.array([])
        scale, unit = 1.0, ""
        if finite.size and 0 < np.nanmax(np.abs(finite)) < 0.05:
            scale, unit = 1e3, " (×10⁻³ mm²/s)"
        n_nodes = 100
        for side, v in values.items():
            n_nodes = max(n_nodes, len(v))
            ax.plot(profiles[side]["node"], v * scale, color=COLORS[side], lw=1.6,
                    label=TRACT_NAMES[side])
        if levels:
            _shade_levels(ax, levels, np.arange(len(levels)), annotate=False)
        _shade_segments(ax, segments, label=False)
        ax.set_xlim(-0.5, n_nodes - 0.5)
        ax.set_title(_DIFF_LABELS.get(metric, metric.upper()) + unit, fontsize=9)
        ax.set_xlabel("Node (inferior → superior)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="y", color="#e5e5e5", lw=0.6)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _centroid_world(img, data, value=None):
    mask = data > 0 if value is None else data == value
    if not mask.any():
        return None
    ijk = np.array(ndimage.center_of_mass(mask))
    return nib.affines.apply_affine(img.affine, ijk)


def plot_mask_overlay(fa_img, mask_img, *, planes=("axial", "coronal", "sagittal")) -> Figure:
    """Brain-mask outline (red) on world-aligned FA slices through the mask centroid."""
    mask = _volume(mask_img) > 0
    center = _centroid_world(mask_img, mask.astype(np.float32))
    if center is None:
        center = nib.affines.apply_affine(mask_img.affine, np.array(mask_img.shape[:3]) / 2)
    bbox = _world_bbox(mask_img)
    if fa_img is not None:
        fa_box = _world_bbox(fa_img, _volume(fa_img), 0.02)
        bbox = np.stack([np.minimum(bbox[:, 0], fa_box[:, 0]),
                         np.maximum(bbox[:, 1], fa_box[:, 1])], axis=1)
    step = max(min(_voxel_step(mask_img), 2.0), _display_step(bbox))
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = _new_figure(max(3.0 * sum(widths), 3.5), 3.4)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    fa_data = _volume(fa_img) if fa_img is not None else None
    mask_f = mask.astype(np.float32)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        position = float(center[PLANES[plane][2]])
        extent = _panel_extent(bbox, plane)
        _draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
        m = sample_world_slice(mask_img, plane, position, extent, step=step, order=0,
                               data=mask_f)
        if m.any() and not m.all():
            hs = np.linspace(extent[0], extent[1], m.shape[1])
            vs = np.linspace(extent[2], extent[3], m.shape[0])
            ax.contour(hs, vs, m, levels=[0.5], colors=[PEAK_COLOR], linewidths=1.2)
        _style_panel(ax, plane, position, extent)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02)
    return fig


_ROI_COLORS = {1: "#e41a1c", 2: "#ff7f00", 3: "#4daf4a", 4: "#984ea3", 5: "#377eb8",
               6: "#a65628", 7: "#f781bf", 8: "#ffff33"}


def plot_roi_overlay(fa_img, rois_img) -> Figure:
    """CST ROI labels on axial FA slices, one panel per ROI pair (through their centroid)."""
    from matplotlib.colors import ListedColormap

    labels = np.rint(_volume(rois_img)).astype(np.int16)
    pairs = (("motor", 1, 2), ("PLIC", 3, 4), ("peduncle", 5, 6), ("pons", 7, 8))
    panels = []
    for name, left, right in pairs:
        present = [v for v in (left, right) if (labels == v).any()]
        if present:
            centers = [_centroid_world(rois_img, labels, v) for v in present]
            panels.append((name, float(np.mean([c[2] for c in centers]))))
    if not panels:
        raise ValueError("the ROI image holds none of the labels 1–8")
    bbox = _world_bbox(rois_img)
    fa_data = _volume(fa_img) if fa_img is not None else None
    if fa_img is not None:
        bbox = _world_bbox(fa_img, fa_data, 0.02)
    step = max(min(_voxel_step(rois_img), 2.0), _display_step(bbox))
    cmap = ListedColormap([_ROI_COLORS[k] for k in range(1, 9)])
    fig = _new_figure(2.6 * len(panels), 3.5)
    for i, (name, z) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        extent = _panel_extent(bbox, "axial")
        _draw_slice(ax, fa_img, "axial", z, extent, step=step, data=fa_data)
        lab = sample_world_slice(rois_img, "axial", z, extent, step=step, order=0,
                                 data=labels.astype(np.float32))
        shown = np.ma.masked_where((lab < 1) | (lab > 8), lab)
        ax.imshow(shown, cmap=cmap, vmin=0.5, vmax=8.5, origin="lower", extent=extent,
                  interpolation="nearest", alpha=0.75, aspect="equal")
        _style_panel(ax, "axial", z, extent)
        ax.set_title(f"{name}: z = {_fmt_mm(z)} mm", fontsize=9)
    handles = [Patch(color=_ROI_COLORS[k], label=v) for k, v in ROI_LABELS.items()
               if (labels == k).any()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7.5,
               frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.04)
    return fig


# --------------------------------------------------------------------------------------
# Colour FA, glass brain, registration
# --------------------------------------------------------------------------------------

def _load_vectors(path, what, notes):
    """A 4D X×Y×Z×3 vector image, or None plus a note."""
    img = _load_image(path, what, notes)
    if img is None:
        return None
    if len(img.shape) != 4 or img.shape[3] != 3:
        notes.append(f"The {what} file is not an X×Y×Z×3 vector image "
                     f"({Path(path).name}: shape {tuple(img.shape)}).")
        return None
    return img


def world_abs_directions(v1_img):
    """|principal direction| in the world RAS frame, (X, Y, Z, 3) float32 on the V1 grid.

    The V1 image holds unit vectors in the voxel-axis frame (DIPY's convention);
    :func:`pipeline.dwi.voxel_directions_to_world` maps them to world RAS+ with the
    affine's normalised linear part, so red = left-right, green = anterior-posterior
    and blue = inferior-superior whatever the storage orientation.  The absolute
    value removes the sign ambiguity of an eigenvector (and so can be interpolated).
    """
    vectors = np.nan_to_num(np.asarray(v1_img.dataobj, dtype=np.float32))
    world = voxel_directions_to_world(vectors, np.asarray(v1_img.affine, dtype=float))
    return np.abs(world).astype(np.float32)


def _color_fa_slice(fa_img, fa_data, v1_img, v1_world, plane, position, extent, step):
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


def _slices_bbox(fa_img, fa_data, points, *, peak=None, center=None):
    boxes = []
    if fa_img is not None:
        boxes.append(_world_bbox(fa_img, fa_data, threshold=0.02))
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
    fa_data = _volume(fa_img)
    v1_world = world_abs_directions(v1_img)
    points = {side: _all_points(streamlines.get(side, [])) for side in SIDES}
    if bbox is None:
        bbox = _slices_bbox(fa_img, fa_data, points, center=center)
    bbox = np.asarray(bbox, dtype=float)
    step = max(min(_voxel_step(fa_img), 2.0), _display_step(bbox))
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = _new_figure(max(3.2 * sum(widths), 3.5) + 0.4, 3.8)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.04)
    for i, plane in enumerate(planes):
        ax = fig.add_subplot(gs[0, i])
        position = float(center[PLANES[plane][2]])
        if plane == "sagittal" and sagittal_x is not None:
            position = float(sagittal_x)
        extent = _panel_extent(bbox, plane)
        rgb = _color_fa_slice(fa_img, fa_data, v1_img, v1_world, plane, position, extent, step)
        ax.imshow(rgb, origin="lower", extent=extent, interpolation="bilinear",
                  aspect="equal")
        for side, style in zip(SIDES, ("-", "--")):
            xy = project_points(points[side], plane, position, slab_mm)
            _tract_outline(ax, xy, extent, step, COLORS[side], linestyle=style)
        _style_panel(ax, plane, position, extent)
    handles = [Line2D([], [], color=COLORS[s], lw=2, ls=ls, label=f"{TRACT_NAMES[s]} ({s})")
               for s, ls in zip(SIDES, ("-", "--"))]
    handles += [Patch(color=c, label=t) for c, t in (("#e41a1c", "left-right"),
                                                     ("#33cc33", "anterior-posterior"),
                                                     ("#3355ff", "inferior-superior"))]
    _finish_panel_figure(fig, handles, legend_fontsize=8.5)
    return fig


def _silhouette_points(mask_img, fa_img):
    """World coordinates of the brain voxels (mask, else FA > 0.02); None if none."""
    for img, threshold in ((mask_img, 0.0), (fa_img, 0.02)):
        if img is None:
            continue
        ijk = np.argwhere(_volume(img) > threshold)
        if len(ijk):
            if len(ijk) > 600_000:  # keep it fast on 1 mm masks; the outline is unchanged
                ijk = ijk[np.random.default_rng(0).choice(len(ijk), 600_000, replace=False)]
            return nib.affines.apply_affine(img.affine, ijk), _voxel_step(img)
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
    points = {side: _all_points(streamlines.get(side, [])) for side in SIDES}
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
    step = max(brain_step or 1.0, _display_step(bbox, 300))
    fine = max(1.0, _display_step(bbox, 400))  # track density grid
    widths = [(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8)
              / max(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8, 1) for p in planes]
    fig = _new_figure(max(2.6 * sum(widths), 3.5) + 0.4, 3.3)
    gs = fig.add_gridspec(1, len(planes), width_ratios=widths, wspace=0.05)
    from matplotlib.colors import to_rgb

    for i, (plane, sides, title) in enumerate(panels):
        h_axis, v_axis, f_axis = PLANES[plane]
        ax = fig.add_subplot(gs[0, i])
        extent = _panel_extent(bbox, plane)
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
        _bare_axes(ax, extent)
        ax.set_title(title, fontsize=10)
        _orientation_labels(ax, plane, color="#333")
    handles = [Patch(color=COLORS[s], label=f"{TRACT_NAMES[s]} ({s})") for s in SIDES]
    if brain is not None:
        handles.append(Patch(facecolor="#ededed", edgecolor="#8c8c8c", label="brain outline"))
    _finish_panel_figure(fig, handles, legend_fontsize=9)
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
    fa_data = _volume(fa_img)
    tpl = np.nan_to_num(_volume(template_img))
    if _is_label_image(tpl):
        level, what = 0.5, "template brain mask"
    else:
        positive = tpl[tpl > 0]
        level = 0.4 * float(np.percentile(positive, 99)) if positive.size else 0.5
        what = "template FA (white matter)"
    bbox = _world_bbox(fa_img, fa_data, 0.02)
    step = max(min(_voxel_step(fa_img), 2.0), _display_step(bbox, 250))
    planes = ("axial", "coronal", "sagittal")
    heights = [(bbox[PLANES[p][1], 1] - bbox[PLANES[p][1], 0] + 8)
               / max(bbox[PLANES[p][0], 1] - bbox[PLANES[p][0], 0] + 8, 1) for p in planes]
    panel_w = 2.3
    fig = _new_figure(panel_w * n_slices + 0.2, panel_w * sum(heights) + 1.3)
    gs = fig.add_gridspec(len(planes), n_slices, height_ratios=heights, wspace=0.03,
                          hspace=0.16)
    fractions = np.linspace(0.22, 0.78, n_slices)
    for row, plane in enumerate(planes):
        f_axis = PLANES[plane][2]
        for col, frac in enumerate(fractions):
            position = float(bbox[f_axis, 0] + frac * (bbox[f_axis, 1] - bbox[f_axis, 0]))
            ax = fig.add_subplot(gs[row, col])
            extent = _panel_extent(bbox, plane)
            _draw_slice(ax, fa_img, plane, position, extent, step=step, data=fa_data)
            t = sample_world_slice(template_img, plane, position, extent, step=step,
                                   data=tpl.astype(np.float32))
            if what != "template brain mask":
                t = ndimage.gaussian_filter(t, 0.6)
            if t.min() < level < t.max():
                hs = np.linspace(extent[0], extent[1], t.shape[1])
                vs = np.linspace(extent[2], extent[3], t.shape[0])
                ax.contour(hs, vs, t, levels=[level], colors=["#ff3b30"], linewidths=0.9)
            _style_panel(ax, plane, position, extent)
            ax.set_title(f"{plane[:3]}. {_AXIS_NAME[f_axis]} = {_fmt_mm(position)} mm",
                         fontsize=8)
            for text in ax.texts:
                text.set_fontsize(8)
    fig.legend(handles=[Line2D([], [], color="#ff3b30", lw=1.5,
                               label=f"{what}, warped to the subject")],
               loc="lower center", frameon=False, fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.06)
    return fig


# --------------------------------------------------------------------------------------
# Report text
# --------------------------------------------------------------------------------------

def _entities_label(subject, entities) -> str:
    parts = []
    if subject:
        parts.append(f"sub-{subject}" if not str(subject).startswith("sub-") else str(subject))
    if isinstance(entities, dict):
        for key, value in entities.items():
            if value not in (None, "") and key not in ("subject", "sub"):
                parts.append(f"{key}-{value}")
    return "_".join(parts)


def _peak_words(peak) -> str:
    if peak is None or len(peak) < 3:
        return ""
    x, y, z = (_fmt_mm(v) for v in peak[:3])
    return f"x={x}, y={y}, z={z} mm RAS"


def _level_words(level) -> str:
    if not level:
        return "an unknown level"
    text = str(level).replace("_", " ")
    return f"the {text}"


def _finding_level(loc):
    """Level of the finding's peak: its atlas level, or "cerebral_peduncle /
    internal_capsule boundary" when ``levels_near_boundary`` names two levels (the peak
    lies within :data:`pipeline.localization.BOUNDARY_MARGIN_MM` of their boundary)."""
    near = [str(level) for level in (loc.get("levels_near_boundary") or []) if level]
    return " / ".join(near) + " boundary" if len(near) >= 2 else loc.get("level")


def _fmt_p(value) -> str:
    """A p value as written in a paper: 'p = 0.10', 'p = 0.004', 'p < 0.001'."""
    value = _num(value)
    if not math.isfinite(value):
        return "p not recorded"
    if value < 0.001:
        return "p < 0.001"
    return f"p = {value:.2f}" if value >= 0.01 else f"p = {value:.3f}"


def _rate_words(rate) -> str:
    """A probability as a percentage: 0.01 → '1 %', 0.005 → '0.5 %'."""
    rate = _num(rate)
    return "n/a" if not math.isfinite(rate) else f"{_fmt_num(100 * rate)} %"


def _calibrated_test_words(statistic) -> str:
    """The calibrated rule's test in words, '' when ``localization.statistic`` is not
    recorded: "the largest window asymmetry was |t| = 2.8 against a threshold of 3.5
    (calibrated to a 1 % chance of a finding on a healthy scan of this quality;
    p = 0.10)"."""
    if not isinstance(statistic, dict):
        return ""
    value, threshold = _num(statistic.get("value")), _num(statistic.get("threshold"))
    if not (math.isfinite(value) and math.isfinite(threshold)):
        return ""
    # One decimal, two where one would make the statistic and the threshold look equal.
    digits = 1 if f"{value:.1f}" != f"{threshold:.1f}" else 2
    return (f"the largest window asymmetry was |t| = {value:.{digits}f} against a threshold "
            f"of {threshold:.{digits}f} (calibrated to a "
            f"{_rate_words(statistic.get('false_positive_rate'))} chance of a finding on a "
            f"healthy scan of this quality; {_fmt_p(statistic.get('p_value'))})")


def verdict(metrics) -> dict:
    """Plain-words verdict from the metrics.

    The sentence states the test of the rule the run used
    (``localization.thresholds.method``): under the calibrated rule the largest
    window |t|, its threshold, the false-finding rate it is calibrated to and the
    p value; under the fixed-AI rule the |AI| thresholds no segment reached.

    Parameters
    ----------
    metrics : dict
        The run's metrics; any key may be missing.

    Returns
    -------
    dict
        ``status`` ('yes' | 'no' | 'not_assessable'), ``headline``, ``sentence``,
        ``side``, ``level``, ``peak``, ``confidence`` and ``reasons`` (list of str).
    """
    loc = _get(metrics, "localization")
    reasons = [str(w) for w in (_get(metrics, "qc", "warnings", default=[]) or [])]
    out = {"status": "not_assessable", "side": None, "level": None, "peak": None,
           "reasons": reasons, "confidence": None}
    if not isinstance(loc, dict):
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: not assessable"
        out["sentence"] = "No localisation result is available in the metrics."
        return out
    if not loc.get("assessable", True):
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: not assessable"
        out["sentence"] = ("Quality control found that the corticospinal tracts could not be "
                           "assessed; no statement on upper-motor-neuron damage is made.")
        if not reasons:  # fall back on the prognosis rationale (QC reasons there too)
            rationale = _get(metrics, "prognosis", "rationale")
            if isinstance(rationale, str):
                rationale = [rationale]
            if isinstance(rationale, list):
                reasons.extend(str(r) for r in rationale)
        return out
    thr = _get(loc, "thresholds") or {}
    method = _detection_method(thr)
    test = _calibrated_test_words(loc.get("statistic")) if method == "calibrated" else ""
    if loc.get("umn_damage"):
        side = loc.get("affected_side") or "unknown"
        peak = loc.get("peak_ras_mm")
        confidence = loc.get("confidence")
        out.update(status="yes", side=side, level=loc.get("level"), peak=peak,
                   confidence=confidence)
        where = f" (peak at {_peak_words(peak)})" if peak is not None else ""
        out["headline"] = "Upper-motor-neuron (UMN) damage shown: yes"
        out["sentence"] = (f"Reduced FA along the {side} CST at "
                           f"{_level_words(_finding_level(loc))}{where}")
        if test:
            out["sentence"] += f": {test}" + (f", confidence {confidence}" if confidence else "")
        out["sentence"] += "."
        if side in SIDES:
            body = "right" if side == "left" else "left"
            out["sentence"] += (f" A lesion of the {side} CST would affect the {body} side of "
                                f"the body.")
        return out
    detail = f": {test}" if test else ""
    if method == "fixed-ai" and "node_ai" in thr and "min_nodes" in thr:
        detail = (f": no segment of the FA asymmetry profile reached |AI| ≥ "
                  f"{_fmt_num(thr['node_ai'])} over ≥ {_fmt_num(thr['min_nodes'])} "
                  f"consecutive nodes")
        if "segment_mean_ai" in thr:
            detail += f" with a mean |AI| ≥ {_fmt_num(thr['segment_mean_ai'])}"
    out.update(status="no", side="none")
    out["headline"] = "Upper-motor-neuron (UMN) damage shown: no"
    out["sentence"] = f"No imaging evidence of upper-motor-neuron damage along either CST{detail}."
    if isinstance(loc.get("detectable_fa_drop"), dict) and loc["detectable_fa_drop"]:
        out["sentence"] += (" The smallest FA drop this scan could have detected at each level "
                            "is listed under “What a negative result excludes”.")
    return out


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1f2328; --muted:#5b636d; --line:#d8dee4; --bg:#ffffff; --soft:#f6f8fa;
        --red:#b3261e; --green:#1a7f37; --amber:#9a6700; --blue:#0969da; }
* { box-sizing: border-box; }
body { margin:0; color:var(--ink); background:var(--bg);
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
                    sans-serif;
       font-size: 15px; line-height: 1.5; }
nav { position: sticky; top:0; background:#24292f; color:#fff; padding:6px 24px; z-index:2;
      font-size:13px; }
nav a { color:#e6edf3; margin-right:16px; text-decoration:none; }
nav a:hover { text-decoration:underline; }
main { max-width: 1100px; margin: 0 auto; padding: 8px 24px 48px; }
h1 { font-size: 26px; margin: 18px 0 4px; }
h2 { font-size: 20px; border-bottom: 2px solid var(--line); padding-bottom: 4px;
     margin-top: 36px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
.subtitle { color: var(--muted); margin: 0 0 12px; font-size: 14px; }
.banner { background: var(--red); color: #fff; font-weight: 700; font-size: 18px;
          padding: 12px 18px; border-radius: 6px; margin: 12px 0 18px; text-align:center;
          letter-spacing: .2px; }
.banner small { display:block; font-weight: 400; font-size: 13px; opacity: .95; }
.verdict { border: 2px solid var(--line); border-left-width: 10px; border-radius: 6px;
           padding: 12px 18px; margin: 12px 0; background: var(--soft); }
.verdict.yes { border-color: var(--red); }
.verdict.no { border-color: var(--green); }
.verdict.not_assessable { border-color: var(--amber); }
.verdict .headline { font-size: 21px; font-weight: 700; margin: 0 0 4px; }
.verdict .sentence { font-size: 17px; margin: 0 0 8px; }
.facts { display:flex; flex-wrap:wrap; gap: 8px 26px; margin: 6px 0 0; padding:0;
         list-style:none; font-size: 14px; }
.facts li b { color: var(--muted); font-weight: 600; margin-right: 4px; }
.alert { border:1px solid #d4a72c; background:#fff8c5; border-radius:6px;
         padding:8px 14px; margin: 10px 0; font-size: 14px; }
.alert ul { margin: 4px 0; padding-left: 20px; }
.warn { border-color:#cf222e; background:#ffebe9; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border:1px solid var(--line); border-radius:4px;
             display:block; background:#fff; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; max-width: 980px; }
figcaption b { color: var(--ink); }
.placeholder { border:1px dashed #afb8c1; border-radius:4px; padding: 18px; color: var(--muted);
               background: var(--soft); font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left;
         vertical-align: top; }
thead th { background: var(--soft); }
table.kv tbody th { font-weight: 500; color: var(--muted); background: #fbfcfd;
                    font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
                    font-size: 12.5px; }
table.kv td { word-break: break-all; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bad { color: var(--red); font-weight: 600; background: #ffebe9; }
p.tablecap { color: var(--muted); font-size: 13.5px; margin: 10px 0 2px; }
table.qc tbody th { font-weight: 500; }
.badge { display:inline-block; border-radius: 10px; padding: 0 9px; font-size: 12.5px;
         font-weight: 600; color: #fff; vertical-align: 1px; }
.badge.ok { background: var(--green); }
.badge.bad { background: var(--red); }
.metric .big { font-size: 18px; font-weight: 700; }
p.methods { max-width: 980px; }
details { margin: 14px 0; }
summary { cursor: pointer; color: var(--blue); font-size: 14px; }
.muted { color: var(--muted); }
.refs li { margin-bottom: 4px; font-size: 14px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px;
         border-top:1px solid var(--line); padding-top: 8px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%;
       background: var(--soft); padding: 0 3px; border-radius: 3px; }
"""


def _figure_html(uri, caption, *, alt) -> str:
    return (f'<figure><img src="{uri}" alt="{_esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _placeholder(message) -> str:
    return f'<div class="placeholder">{_esc(message)}</div>'


def _draw_figure(make, caption, alt):
    """Draw a figure with ``make()``; a placeholder (with the reason) if it cannot be."""
    try:
        fig = make()
        return _figure_html(figure_to_data_uri(fig), caption, alt=alt)
    except Exception as exc:  # noqa: BLE001 - one bad figure must not sink the report
        LOGGER.exception("report figure %r failed", alt)
        return _placeholder(f"{alt}: figure could not be drawn ({type(exc).__name__}: {exc}).")


#: The figures :func:`build_report_html` asks for, drawn together once the page is laid out.
_PENDING_FIGURES: ContextVar[list | None] = ContextVar("pending_figures", default=None)
#: The pending figures as the forked drawing processes inherit them (see draw_figures).
_FORKED_FIGURES: list = []


def _figure_slot(index) -> str:
    return f"\x00figure-{index}\x00"


def _render_figure(make, caption, alt, *, missing=None):
    """A figure drawn with ``make()`` (a placeholder with the reason if it cannot be).

    Inside :func:`build_report_html` it returns a slot that is filled once all
    figures are drawn (:func:`draw_figures`); elsewhere it draws at once.
    """
    if missing:
        return _placeholder(missing)
    pending = _PENDING_FIGURES.get()
    if pending is None:
        return _draw_figure(make, caption, alt)
    pending.append((make, caption, alt))
    return _figure_slot(len(pending) - 1)


def _draw_forked_figure(index):
    return _draw_figure(*_FORKED_FIGURES[index])


def draw_figures(figures, *, n_jobs=1):
    """HTML of each ``(make, caption, alt)`` figure, in order.

    Each figure is independent and costs 0.1–0.8 s of single-threaded matplotlib,
    so with ``n_jobs`` ≥ 2 they are drawn in that many forked processes, which
    inherit the figures' closures and data instead of receiving them (Linux; serial
    elsewhere, and in a daemonic process, which may not have children). The
    figures, and so the page, are the same either way.
    """
    global _FORKED_FIGURES
    n_workers = min(n_jobs, len(figures))
    if n_workers < 2 or sys.platform != "linux" or multiprocessing.current_process().daemon:
        return [_draw_figure(*figure) for figure in figures]
    _FORKED_FIGURES = figures
    try:
        with multiprocessing.get_context("fork").Pool(n_workers) as pool:
            return pool.map(_draw_forked_figure, range(len(figures)), chunksize=1)
    finally:
        _FORKED_FIGURES = []


def _list_html(items, css=None) -> str:
    items = [i for i in items if i not in (None, "")]
    if not items:
        return ""
    cls = f' class="{css}"' if css else ""
    return f"<ul{cls}>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def _notices(metrics) -> list:
    """``qc.notices``: what a reader must know that did not stop the assessment (a
    corrected gradient table, left-out volumes, heavy motion, header problems)."""
    notices = _get(metrics, "qc", "notices") or []
    return [notices] if isinstance(notices, str) else list(notices)


def _verdict_html(metrics) -> str:
    v = verdict(metrics)
    loc = _get(metrics, "localization") or {}
    facts = []
    if v["status"] == "yes":
        facts = [("UMN damage shown", "yes"), ("Affected side", v["side"]),
                 ("Level", (_finding_level(loc) or "unknown").replace("_", " ")),
                 ("Peak (RAS mm)", _peak_words(v["peak"]) or "n/a")]
        if loc.get("peak_node") is not None:
            facts.append(("Peak node", loc.get("peak_node")))
        if v.get("confidence"):
            facts.append(("Confidence", v["confidence"]))
    elif v["status"] == "no":
        facts = [("UMN damage shown", "no"), ("Affected side", "none")]
    else:
        facts = [("UMN damage shown", "not assessable")]
    facts_html = "".join(f"<li><b>{_esc(k)}:</b> {_esc(val)}</li>" for k, val in facts)
    reasons = ""
    if v["status"] == "not_assessable":
        if v["reasons"]:
            reasons = "<p><b>Why not assessable (QC):</b></p>" + _list_html(v["reasons"])
        else:
            reasons = '<p class="muted">No QC reason was recorded.</p>'
    segments = loc.get("segments") or []
    seg_html = ""
    if segments:
        # The calibrated rule's segments also carry the t of their strongest window.
        with_t = any(isinstance(s, dict) and "peak_t" in s for s in segments)
        head = ("<tr><th>Lower-FA side</th><th>Nodes</th><th>Levels</th><th>Peak node</th>"
                "<th>Peak level</th><th>Peak (RAS mm)</th><th>Peak AI</th><th>Mean AI</th>"
                + ("<th>Window t</th>" if with_t else "") + "</tr>")
        rows = []
        for s in segments:
            if not isinstance(s, dict):
                continue
            levels = " → ".join(str(x).replace("_", " ")
                                for x in (s.get("start_level"), s.get("end_level")) if x)
            cells = [s.get("side"), f"{s.get('start_node')}–{s.get('end_node')}",
                     levels or "n/a", s.get("peak_node"),
                     str(s.get("peak_level") or "n/a").replace("_", " "),
                     _peak_words(s.get("peak_ras_mm")) or "n/a", _fmt_num(s.get("peak_ai")),
                     _fmt_num(s.get("mean_ai"))]
            if with_t:
                cells.append(_fmt_num(s.get("peak_t"), 2))
            rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
        seg_html = ("<h3>Detected segments</h3><table><thead>" + head + "</thead><tbody>"
                    + "".join(rows) + "</tbody></table>")
    notices = _notices(metrics)
    notices_html = ('<div class="alert warn"><b>QC notices</b> (the CST was still assessed; '
                    "read the result with these in mind):" + _list_html(notices)
                    + "</div>") if notices else ""
    return (f'<section id="verdict"><h2>Verdict</h2><div class="verdict {v["status"]}">'
            f'<p class="headline">{_esc(v["headline"])}</p>'
            f'<p class="sentence">{_esc(v["sentence"])}</p>'
            f'<ul class="facts">{facts_html}</ul>{reasons}</div>{notices_html}{seg_html}'
            "</section>")


def _prognosis_html(metrics) -> str:
    prog = _get(metrics, "prognosis")
    if not isinstance(prog, dict):
        return ('<section id="prognosis"><h2>Prognosis</h2>'
                + _placeholder("No prognosis is available in the metrics.") + "</section>")
    rationale = prog.get("rationale") or []
    if isinstance(rationale, str):
        rationale = [rationale]
    refs = prog.get("references") or []
    if isinstance(refs, str):
        refs = [refs]
    parts = ['<section id="prognosis"><h2>Prognosis</h2>',
             f'<p><b>Category:</b> {_esc(_humanise(prog.get("category") or "n/a"))}</p>',
             f'<p>{_esc(prog.get("summary") or "")}</p>']
    prep2 = prog.get("prep2")
    if isinstance(prep2, dict):
        parts.append(_prep2_html(prep2, _get(metrics, "clinical") or {}))
        # its steps are listed in the PREP2 block just drawn
        rationale = [r for r in rationale if not str(r).startswith("PREP2: ")]
    context = prog.get("context")
    if isinstance(context, dict):
        parts.append(f"<h3>Context for {_esc(context.get('diagnosis') or 'this diagnosis')}"
                     f"</h3><p class=\"muted\">{_esc(context.get('label') or '')}; "
                     f"{_esc(context.get('source') or '')}</p>"
                     + _list_html(context.get("statements") or []))
        statements = set(context.get("statements") or [])
        rationale = [r for r in rationale if r not in statements
                     and not str(r).startswith("Context (")]
    if rationale:
        parts.append("<h3>Rationale</h3>" + _list_html(rationale))
    thr = prog.get("thresholds")
    if isinstance(thr, dict) and thr:
        parts.append("<p class=\"muted\">Thresholds: " + _esc(", ".join(
            f"{k} = {_fmt_value(v)}" for k, v in thr.items())) + "</p>")
    if refs:
        parts.append("<h3>References</h3>" + _list_html(refs, "refs"))
    parts.append(f'<p class="muted"><i>{_esc(prog.get("disclaimer") or DISCLAIMER)}</i></p>')
    parts.append("</section>")
    return "".join(parts)


def _prep2_html(prep2, clinical) -> str:
    """PREP2 tier with the participant's scores and the decisions that led to it."""
    scores = [("SAFE score (day 3)", clinical.get("safe_score")), ("Age (years)",
              clinical.get("age")), ("MEP status", clinical.get("mep_status")),
              ("NIHSS (day 3)", clinical.get("nihss"))]
    cells = "".join(f"<tr><th>{_esc(label)}</th><td>{_esc(_fmt_value(value))}</td></tr>"
                    for label, value in scores)
    tier = prep2.get("prediction")
    head = (f'<p><b>PREP2 prediction:</b> <span class="big">{_esc(tier)}</span> upper-limb '
            "function at 3 months (from bedside scores, not from imaging).</p>" if tier else
            "<p><b>PREP2 prediction:</b> not possible: participants.tsv lacks "
            + _esc(", ".join(prep2.get("missing") or [])) + ".</p>")
    return ("<h3>PREP2 (Stinear et al. 2017)</h3>" + head
            + '<table class="qc"><tbody>' + cells + "</tbody></table>"
            + _list_html(prep2.get("steps") or []))


def _scaled(value, scale):
    """``value`` × ``scale`` when it is a number, else ``value`` unchanged."""
    if scale == 1 or isinstance(value, bool) or not math.isfinite(_num(value)):
        return value
    return _num(value) * scale


def _summary_table(metrics, counts) -> str:
    cst = _get(metrics, "cst") or {}
    # Diffusivities are stored in mm²/s (about 7e-4 in white matter): shown ×10³.
    rows = [("Streamlines (metrics)", "n_streamlines", 1),
            ("Mean length (mm)", "length_mm_mean", 1), ("Mean FA", "fa_mean", 1),
            ("Mean MD (×10⁻³ mm²/s)", "md_mean", 1e3),
            ("Mean RD (×10⁻³ mm²/s)", "rd_mean", 1e3),
            ("Mean AD (×10⁻³ mm²/s)", "ad_mean", 1e3)]
    body = []
    body.append("<tr><th>Streamlines (tract file)</th>" + "".join(
        f'<td class="num">{_esc("missing" if counts.get(s) is None else counts[s])}</td>'
        for s in SIDES) + "</tr>")
    for label, key, scale in rows:
        cells = "".join(f'<td class="num">{_esc(_fmt_value(_scaled(_get(cst, s, key), scale)))}'
                        "</td>" for s in SIDES)
        body.append(f"<tr><th>{_esc(label)}</th>{cells}</tr>")
    table = ("<table><thead><tr><th></th><th>CST_L (left)</th><th>CST_R (right)</th></tr>"
             "</thead><tbody>" + "".join(body) + "</tbody></table>")
    asym = _get(metrics, "asymmetry") or {}
    # The per-node profiles and their standard errors are drawn, not listed.
    per_node = ("fa_ai_profile", "fa_ai_profile_se", "fa_profile_se")
    arows = [(k, v) for k, v in asym.items() if k not in per_node]
    if arows:
        table += "<h3>Asymmetry</h3>" + _kv_table(_flatten(dict(arows)))
    return table


def _detectable_drop_html(metrics) -> str:
    """The table "What a negative result excludes" ('' when not recorded).

    Per level, the smallest drop of one side's FA this scan could have detected
    (``localization.detectable_fa_drop``, from the calibrated rule), with what such
    a drop means. Levels the table lacks are listed with a dash: no window lies
    wholly in them, so a negative result excludes nothing there.
    """
    loc = _get(metrics, "localization") or {}
    drops = loc.get("detectable_fa_drop")
    if not isinstance(drops, dict) or not drops:
        return ""
    widths = [int(_num(w)) for w in (_get(loc, "thresholds", "window_nodes") or [])
              if _num(w) > 0]
    width = min(widths) if widths else None
    window = f"{width} nodes" if width else "the narrowest window"
    lengths = [_num(_get(metrics, "cst", side, "length_mm_mean")) for side in SIDES]
    lengths = [v for v in lengths if math.isfinite(v)]
    n_nodes = len(_get(metrics, "asymmetry", "fa_ai_profile") or [])
    if width and lengths and n_nodes > 1:
        window += f", about {np.mean(lengths) * width / (n_nodes - 1):.0f} mm of this tract"
    statistic = loc.get("statistic") if isinstance(loc.get("statistic"), dict) else {}
    threshold = _num(statistic.get("threshold"))
    at = (f" at the calibrated threshold |t| = {threshold:.1f} (a "
          f"{_rate_words(statistic.get('false_positive_rate'))} chance of a finding on a "
          f"healthy scan)" if math.isfinite(threshold) else "")
    rows = "".join(
        f"<tr><th>{_esc(str(level).replace('_', ' '))}</th>"
        + (f'<td class="num">{_esc(_pct(drops[level]))}</td>' if level in drops
           else '<td class="num muted">—</td>') + "</tr>"
        for level in list(LEVELS) + [k for k in drops if k not in LEVELS])
    return (
        '<h3 id="sensitivity">What a negative result excludes</h3>'
        '<p class="tablecap">The smallest drop of one side\'s FA, as a percentage of the '
        f"other side's, that this scan could have detected at each level{_esc(at)}. It is a "
        f"drop of the tract's mean FA over a window of {_esc(window)}: a focal lesion that "
        "affects only part of the tract's cross-section must lower FA by more where it lies, "
        "and smaller or more focal changes may go unseen. A dash: no window lies wholly in "
        "that level (not reached by the profile, or too short), so a negative result "
        "excludes nothing there.</p>"
        '<table class="qc"><thead><tr><th>Level</th><th>Smallest detectable FA drop</th>'
        "</tr></thead><tbody>" + rows + "</tbody></table>")


_ROI_NAMES = {"motor": "Motor cortex", "plic": "Posterior limb of the internal capsule",
              "peduncle": "Cerebral peduncle", "pons": "Pons", "medulla": "Medulla"}


def _badge(ok, yes="pass", no="below limit") -> str:
    if ok is None:
        return ""
    return f' <span class="badge {"ok" if ok else "bad"}">{_esc(yes if ok else no)}</span>'


def _pct(value) -> str:
    value = _num(value)
    return "n/a" if not math.isfinite(value) else f"{100 * value:.0f} %"


def _registration_qc_html(qc) -> str:
    reg = qc.get("registration") if isinstance(qc, dict) else None
    if not isinstance(reg, dict) or not reg:
        return '<h3>Registration</h3><p class="muted">No registration QC is recorded.</p>'
    limits = qc.get("limits") if isinstance(qc.get("limits"), dict) else {}
    parts = ["<h3>Registration</h3>"]
    r = _num(reg.get("template_fa_correlation"))
    r_min = _num(limits.get("min_template_correlation"))
    ok = (r >= r_min) if math.isfinite(r) and math.isfinite(r_min) else None
    parts.append(
        f'<p class="metric"><b>FA correlation with the MNI template</b> (subject FA warped to '
        f'the template, inside the template brain): <span class="big">{_esc(_fmt_num(r))}</span>'
        + (f' <span class="muted">(limit ≥ {_esc(_fmt_num(r_min))})</span>'
           if math.isfinite(r_min) else "") + _badge(ok, no="registration looks failed")
        + "</p>")
    coverage = reg.get("roi_coverage")
    if isinstance(coverage, dict) and coverage:
        c_min = _num(limits.get("min_roi_coverage"))
        brainstem_min = _num(limits.get("min_brainstem_coverage"))
        names = list(dict.fromkeys([k.rsplit("_", 1)[0] for k in coverage]))
        rows = []
        for name in names:
            limit = brainstem_min if name == "peduncle" and math.isfinite(brainstem_min) \
                else c_min
            cells = []
            for hemi in ("L", "R"):
                key = f"{name}_{hemi}"
                if key not in coverage:
                    cells.append('<td class="num muted">—</td>')
                    continue
                value = _num(coverage[key])
                low = math.isfinite(limit) and math.isfinite(value) and value < limit
                cells.append(f'<td class="num{" bad" if low else ""}">{_esc(_pct(value))}'
                             f'{" ⚠" if low else ""}</td>')
            label = _ROI_NAMES.get(name, _humanise(name))
            rows.append(f"<tr><th>{_esc(label)} <code>{_esc(name)}</code></th>{''.join(cells)}"
                        "</tr>")
        parts.append(
            "<p class=\"tablecap\">ROI coverage: fraction of each template ROI inside the "
            "subject's brain mask (field of view)"
            + (f"; limit ≥ {_esc(_pct(c_min))}" if math.isfinite(c_min) else "")
            + (f", cerebral peduncles ≥ {_esc(_pct(brainstem_min))}"
               if math.isfinite(brainstem_min) else "")
            + "</p><table class=\"qc\"><thead><tr><th>ROI</th><th>Left</th><th>Right</th>"
            "</tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")
    return "".join(parts)


def _landmark_name(name) -> str:
    """A brainstem landmark (``qc.tracking.inferior_landmark``) in words: 'cerebral peduncle'."""
    return _ROI_NAMES.get(str(name), _humanise(name)).lower()


def _tracking_qc_html(qc, metrics) -> str:
    trk = qc.get("tracking") if isinstance(qc, dict) else None
    if not isinstance(trk, dict) or not trk:
        return '<h3>Tractography</h3><p class="muted">No tracking QC is recorded.</p>'
    limits = qc.get("limits") if isinstance(qc.get("limits"), dict) else {}
    parts = ["<h3>Tractography</h3>"]
    facts = [("Seeds", _fmt_value(trk.get("n_seeds"))),
             ("Streamlines tracked", _fmt_value(trk.get("n_streamlines_tracked")))]
    if trk.get("method"):
        reason = _get(trk, "model_choice", "reason")
        facts.insert(0, ("Model", str(trk["method"]) + (f" ({reason})" if reason else "")))
    if trk.get("inferior_landmark"):
        facts.append(("Inferior landmark", _landmark_name(trk["inferior_landmark"])))
    start_z = _num(trk.get("profile_start_mni_z"))
    if math.isfinite(start_z):
        facts.append(("Profiles start at (both sides)", f"MNI z = {_fmt_mm(start_z)} mm"))
    tried = trk.get("landmark_streamlines")
    if isinstance(tried, dict) and tried:
        facts.append(("Streamlines per landmark tried (left / right)", "; ".join(
            f"{_landmark_name(name)} {_fmt_value(_get(counts, 'left'))} / "
            f"{_fmt_value(_get(counts, 'right'))}" for name, counts in tried.items())))
    parts.append('<ul class="facts">' + "".join(
        f"<li><b>{_esc(k)}:</b> {_esc(v)}</li>" for k, v in facts) + "</ul>")
    sides = trk.get("sides")
    if isinstance(sides, dict) and sides:
        n_min = _num(limits.get("min_streamlines"))
        stages = (("selected", "Selected (through the ipsilateral ROIs)"),
                  ("clipped", "Clipped (profile start height → motor cortex)"),
                  ("cleaned", "Cleaned (outliers removed; the final CST)"))
        rows = []
        for key, label in stages:
            cells = []
            for side in SIDES:
                value = _get(sides, side, key)
                low = (key == "cleaned" and math.isfinite(n_min) and
                       math.isfinite(_num(value)) and _num(value) < n_min)
                cells.append(f'<td class="num{" bad" if low else ""}">{_esc(_fmt_value(value))}'
                             f'{" ⚠" if low else ""}</td>')
            rows.append(f"<tr><th>{_esc(label)}</th>{''.join(cells)}</tr>")
        known = {k for k, _ in stages}
        for key in sorted({k for s in sides.values() if isinstance(s, dict) for k in s} - known):
            rows.append(f"<tr><th>{_esc(_humanise(key))}</th>" + "".join(
                f'<td class="num">{_esc(_fmt_value(_get(sides, s, key)))}</td>' for s in SIDES)
                + "</tr>")
        parts.append(
            "<p class=\"tablecap\">Streamlines per side"
            + (f"; a CST needs ≥ {_esc(_fmt_num(n_min))}" if math.isfinite(n_min) else "")
            + "</p><table class=\"qc\"><thead><tr><th>Stage</th><th>CST_L (left)</th>"
            "<th>CST_R (right)</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return "".join(parts)


def plot_motion(motion, outlier_volumes=()) -> Figure:
    """Per-volume translation, rotation and framewise displacement, outliers marked."""
    translation = np.asarray(motion["translation_mm"], dtype=float)
    rotation = np.asarray(motion["rotation_deg"], dtype=float)
    fd = np.asarray(motion["framewise_displacement_mm"], dtype=float)
    volumes = np.arange(len(fd))
    fig = _new_figure(9.0, 5.4)
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
    fig = _new_figure(7.5, 0.32 * len(labels) + 1.0)
    ax = fig.subplots()
    ax.barh(range(len(labels)), scores, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("mean streamline length (mm) — higher: more coherent fibres")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _preprocessing_qc_html(qc, params) -> str:
    noise = qc.get("noise") if isinstance(qc.get("noise"), dict) else {}
    motion = qc.get("motion") if isinstance(qc.get("motion"), dict) else None
    outliers = qc.get("outliers") if isinstance(qc.get("outliers"), dict) else {}
    check = qc.get("gradient_check") if isinstance(qc.get("gradient_check"), dict) else None
    tensor = _get(qc, "preprocessing", "tensor") or {}
    pre_params = params.get("preprocessing") if isinstance(params.get("preprocessing"), dict) \
        else {}
    flagged = [int(v) for v in outliers.get("volumes") or []]
    rows = [("Denoising", noise.get("method", _get(qc, "preprocessing", "denoise"))),
            ("Median noise σ (signal units)", noise.get("noise_sigma_median",
                                                        _get(qc, "preprocessing",
                                                             "noise_sigma_median"))),
            ("SNR of the mean b0 (median, brain)", noise.get("snr_b0")),
            ("Gibbs-ringing removal", pre_params.get("gibbs")),
            ("Brain-mask volume (mL)", noise.get("brain_mask_ml",
                                                  _get(qc, "preprocessing", "brain_mask_ml")))]
    if motion:
        rows += [("Motion model", motion.get("model")),
                 ("Max translation (mm)", motion.get("max_translation_mm")),
                 ("Max rotation (°)", motion.get("max_rotation_deg")),
                 ("Mean framewise displacement (mm)", motion.get("mean_framewise_displacement_mm"))]
    else:
        rows.append(("Motion correction", "off"))
    reasons = outliers.get("reasons") or {}
    rows.append(("Outlier volumes", ", ".join(f"{v} ({reasons.get(str(v), reasons.get(v, ''))})"
                                              for v in flagged) or "none"))
    if check:
        rows += [("Gradient-table check", check.get("status")),
                 ("Correction applied", check.get("correction") or "none"),
                 ("Coherence before → after (mm)",
                  f"{_fmt_num(check.get('score_before'))} → {_fmt_num(check.get('score_after'))}")]
    if tensor:
        rows += [("Tensor fit: shells (s/mm²)",
                  ", ".join(f"{b:g}" for b in tensor.get("shells", []))),
                 ("Tensor fit: volumes used", tensor.get("n_volumes"))]
    rows = [(k, v) for k, v in rows if v is not None]
    parts = ["<h3>Preprocessing</h3>", _kv_table(rows, headers=("Check", "Value"), css="qc")]
    if motion and motion.get("translation_mm"):
        parts.append(_render_figure(
            lambda: plot_motion(motion, flagged),
            "<b>Motion.</b> Translation and rotation of each volume relative to the mean b0, "
            "about the world (RAS) axes, and framewise displacement (Power et al. 2012; 50 mm "
            "sphere). Red bands mark outlier volumes"
            + (" left out of the tensor fit." if outliers.get("excluded") else "."),
            "Motion parameters"))
    if check and check.get("candidates"):
        status = check.get("status")
        parts.append(_render_figure(
            lambda: plot_gradient_check(check["candidates"], check.get("correction")),
            "<b>Gradient-table check.</b> Fibre coherence (mean length of short tensor "
            "streamlines; Jeurissen et al. 2014) for the b-vectors as given (blue) and the best "
            "axis flips/permutations. "
            + ("The table was <b>corrected</b> (red bar) before fitting; check how this scan's "
               "b-vectors were exported." if status == "corrected" else
               "The table as given is the most coherent: no correction."),
            "Gradient-table check"))
    return "".join(parts)


def _qc_html(metrics, counts, fa_img, mask_img, rois_img, notes, template_img=None) -> str:
    qc = _get(metrics, "qc") or {}
    qc = qc if isinstance(qc, dict) else {}
    parts = ['<section id="qc"><h2>Quality control</h2>']
    parts.append("<h3>Tract summary</h3>" + _summary_table(metrics, counts))
    parts.append(_detectable_drop_html(metrics))
    warnings = qc.get("warnings")
    notices = _notices(metrics)
    parts.append("<h3>QC warnings</h3>")
    if warnings:
        if isinstance(warnings, str):
            warnings = [warnings]
        parts.append('<div class="alert warn">' + _list_html(warnings) + "</div>")
    elif notices:
        parts.append('<p class="muted">No QC warning: the CST was assessable. See the notices '
                     "below.</p>")
    else:
        parts.append('<p class="muted">No QC warnings or notices.</p>')
    if notices:
        parts.append('<h3>QC notices</h3><p class="muted">They do not make the run '
                     'unassessable.</p><div class="alert warn">' + _list_html(notices)
                     + "</div>")
    parts.append(_registration_qc_html(qc))
    r = _get(qc, "registration", "template_fa_correlation")
    r_text = (f" The FA correlation with the template is {_esc(_fmt_num(r))}."
              if r is not None else "")
    if template_img is not None:
        parts.append(_render_figure(
            lambda: plot_registration(fa_img, template_img),
            "<b>Registration.</b> Subject FA (grey, world-aligned slices spread over the "
            "brain) with the outline of the MNI template warped to the subject (red). The "
            "outline should follow the brain edge and the white-matter boundaries "
            "(ventricles, internal capsule, brainstem); a shifted, rotated or scaled outline "
            "means the template ROIs, and so the CST, are misplaced." + r_text,
            "Registration QC",
            missing=None if fa_img is not None else
            "Registration figure not available: no FA image."))
    else:
        parts.append(_placeholder(
            "Registration figure skipped: " + next(
                (n for n in notes if "template" in n),
                "no template image resampled to the subject grid was given.")))
    parts.append(_tracking_qc_html(qc, metrics))
    params = _get(metrics, "provenance", "parameters") or {}
    parts.append(_preprocessing_qc_html(qc, params if isinstance(params, dict) else {}))
    parts.append("<h3>Brain mask</h3>")
    if mask_img is not None:
        parts.append(_render_figure(
            lambda: plot_mask_overlay(fa_img, mask_img),
            "<b>Brain mask.</b> Outline of the brain mask (red) on world-aligned FA slices "
            "through the mask centroid. The mask should cover the whole brain including the "
            "brainstem down to the medulla; a cut-off brainstem or cortex limits the CST.",
            "Brain mask outline"))
    else:
        parts.append(_placeholder("Brain mask not available: " + (
            next((n for n in notes if "brain mask" in n), "not given."))))
    parts.append("<h3>CST regions of interest</h3>")
    if rois_img is not None:
        parts.append(_render_figure(
            lambda: plot_roi_overlay(fa_img, rois_img),
            "<b>CST ROIs in subject space.</b> Template ROIs (motor cortex, posterior limb of "
            "the internal capsule, cerebral peduncle, pons) warped to the subject, on axial FA "
            "slices through each ROI pair. Each ROI should sit on the corresponding structure; "
            "a shifted ROI points to a registration failure.",
            "CST ROI overlay"))
    else:
        parts.append(_placeholder("ROI image not available: " + (
            next((n for n in notes if "ROI" in n), "not given."))))
    other = {k: v for k, v in qc.items() if k != "warnings"}
    if other:
        parts.append("<details><summary>All QC values</summary>"
                     + _kv_table(_flatten(other)) + "</details>")
    parts.append("</section>")
    return "".join(parts)


_DENOISE_WORDS = {"mppca": "denoised with MP-PCA (Veraart et al. 2016)",
                  "patch2self": "denoised with Patch2Self",
                  "nlmeans": "denoised with non-local means"}


def _p(params, *keys):
    """A parameter as display text, or None when not recorded."""
    value = _get(params, *keys)
    if value is None or isinstance(value, (dict, list)):
        return None
    return _fmt_value(value)


def _fitted_shells_words(metrics, params) -> str:
    """What the tensor was fitted to, from the shells actually used
    (``qc.preprocessing.tensor``), not from the ``--dti-max-bvalue`` setting alone."""
    tensor = _get(metrics, "qc", "preprocessing", "tensor") or {}
    shells = [_num(b) for b in (tensor.get("shells") or []) if math.isfinite(_num(b))]
    limit = _num(_get(params, "preprocessing", "dti_max_bvalue"))
    if not shells:
        return ("the b = 0 volumes and the shells up to "
                + (f"{_fmt_num(limit)} s/mm²" if math.isfinite(limit) else "(not recorded)")
                + " (the shells used were not recorded)")
    values = ", ".join(_fmt_num(b) for b in sorted(shells))
    words = (f"the b = 0 volumes and the b = {values} s/mm² shell" if len(shells) == 1 else
             f"the b = 0 volumes and the b = {values} s/mm² shells")
    n = _num(tensor.get("n_volumes"))
    if math.isfinite(n):
        words += f" ({_fmt_num(n)} volumes)"
    if math.isfinite(limit) and min(shells) > limit:
        words += (f"; every shell lay above the {_fmt_num(limit)} s/mm² preferred for the "
                  f"tensor, so the lowest was used")
    return words


def methods_text(metrics) -> str:
    """The Methods paragraph (HTML) generated from the run's recorded parameters."""
    prov = _get(metrics, "provenance") or {}
    params = prov.get("parameters") if isinstance(prov, dict) else None
    params = params if isinstance(params, dict) else {}
    software = prov.get("software") if isinstance(prov, dict) else None
    software = software if isinstance(software, dict) else {}

    def ver(name, label=None):
        v = software.get(name)
        return f"{label or name} {_esc(v)}" if v else (label or name)

    def val(*keys, unit=""):
        text = _p(params, *keys)
        return f"{_esc(text)}{unit}" if text is not None else "(not recorded)"

    def pct(*keys):
        value = _num(_get(params, *keys))
        return _pct(value) if math.isfinite(value) else "(not recorded)"

    pre = params.get("preprocessing") if isinstance(params.get("preprocessing"), dict) else {}
    sentences = []
    denoise = pre.get("denoise")
    if denoise in (None, ""):
        den = "denoised (method not recorded)"
    elif str(denoise).lower() in ("none", "false", "off", "no"):
        den = "not denoised"
    else:
        den = _DENOISE_WORDS.get(str(denoise).lower(), f"denoised ({_esc(denoise)})")
    sentences.append(
        f"Diffusion-weighted images were {den}; volumes with b ≤ "
        f"{val('preprocessing', 'b0_threshold', unit=' s/mm²')} "
        f"were treated as b = 0, and the brain mask was computed with "
        f"<code>{val('preprocessing', 'brain_mask')}</code> (the mean b = 0 and the mean "
        f"diffusion-weighted image, united, so that a dark brainstem is kept).")
    if pre.get("gibbs"):
        sentences.append("Gibbs ringing was removed slice by slice with local sub-voxel shifts "
                         "(Kellner et al. 2016).")
    motion = pre.get("motion")
    if motion and motion != "none":
        sentences.append(
            f"Each volume was registered to the mean b = 0 image ({_esc(motion)}, mutual "
            f"information; DIPY) to correct head motion"
            + (" and eddy-current distortion" if motion == "affine" else "")
            + ", and its b-vector was rotated with it (Leemans and Jones 2009).")
    if pre.get("outliers"):
        sentences.append(
            "Volumes with slice-wise signal dropout or extreme motion were flagged"
            + (" and left out of the tensor fit." if pre["outliers"] == "exclude" else
               " (and kept in the fit)."))
    if pre.get("gradient_check") and pre["gradient_check"] != "off":
        sentences.append(
            "The gradient table was checked for axis flips and permutations by fibre coherence "
            "(mean length of tensor streamlines for each of the 24 signed axis permutations; "
            "Jeurissen et al. 2014)"
            + (", and corrected when another table was clearly more coherent."
               if pre["gradient_check"] == "fix" else "."))
    sentences.append(
        f"The diffusion tensor was fitted by {val('preprocessing', 'tensor_fit')} with "
        f"{ver('dipy', 'DIPY')} (Garyfallidis et al. 2014) to "
        f"{_fitted_shells_words(metrics, params)}, giving FA, MD, RD, AD and the principal "
        f"eigenvector.")
    sentences.append(
        "The subject FA map was registered to the MNI152 FA template (affine, then SyN; "
        "Avants et al. 2008) and template CST regions of interest (motor cortex, posterior "
        "limb of the internal capsule, cerebral peduncle, pons) were warped to the subject.")
    tracking_qc = _get(metrics, "qc", "tracking") or {}
    tracking_qc = tracking_qc if isinstance(tracking_qc, dict) else {}
    start_z = _num(tracking_qc.get("profile_start_mni_z"))
    choice = tracking_qc.get("model_choice")
    if isinstance(choice, dict) and choice.get("model") == "csd":
        getter = ("Probabilistic" if _get(metrics, "provenance", "parameters", "tracking",
                                          "direction") == "prob" else "Deterministic")
        if choice.get("csd_kind") == "msmt":
            sentences.append(_msmt_words(choice, software))
            model_words = f"{getter} CSD tractography on the white-matter fODF"
        else:
            sentences.append(
                f"Fibre orientation distributions were estimated by constrained spherical "
                f"deconvolution (Tournier et al. 2007; DIPY) of order "
                f"{_esc(_fmt_value(choice.get('sh_order')))} on the b = "
                f"{_esc(_fmt_value(choice.get('shell_bvalue')))} s/mm² shell "
                f"({_esc(_fmt_value(choice.get('n_directions')))} directions), with a "
                f"single-fibre response from "
                f"{_esc(_fmt_value(choice.get('n_response_voxels')))} voxels of high FA.")
            model_words = f"{getter} CSD tractography"
    else:
        model_words = "Deterministic tensor tractography"
    gap_fa = _num(_get(params, "tracking", "gap_fa"))
    gap_clause = (
        f", except that within {val('tracking', 'corridor_radius_mm', unit=' mm')} of the "
        f"line through each side's CST ROIs tracking went on through FA down to "
        f"{val('tracking', 'gap_fa')} (so that a focal lesion does not cut the tract it "
        f"damages)" if math.isfinite(gap_fa) and gap_fa < _num(_get(params, "tracking", "fa_stop"))
        else "")
    sentences.append(
        f"{model_words} was seeded with {val('tracking', 'seeds_per_voxel')} "
        f"seeds per voxel in the brainstem and internal-capsule ROIs (random seed "
        f"{val('seed')}), with a step of {val('tracking', 'step_mm', unit=' mm')}, stopping "
        f"where FA &lt; {val('tracking', 'fa_stop')} or the turning angle exceeds "
        f"{val('tracking', 'max_angle_deg', unit='°')}{gap_clause}. The inferior landmark "
        f"was the lowest brainstem level (medulla, else pons, else cerebral peduncle) of which "
        f"at least {pct('tracking', 'min_coverage')} of each side's ROI lay in the field of "
        f"view and that both tracts still followed"
        + (f" (here the {_esc(_landmark_name(tracking_qc['inferior_landmark']))})"
           if tracking_qc.get("inferior_landmark") else "")
        + ". Per hemisphere, streamlines passing through the ipsilateral ROIs from that "
        "landmark up and through none of the contralateral peduncle, internal-capsule and "
        "motor ROIs were kept (the corticospinal tract, CST), clipped from one MNI height on "
        "both sides (the lowest that most streamlines of both sides reach, not below the "
        "landmark"
        + (f"; here z = {_esc(_fmt_mm(start_z))} mm" if math.isfinite(start_z) else "")
        + ") to the motor cortex, and cleaned of outliers.")
    sentences.append(
        "Each CST was resampled to 100 nodes from that height (node 0) to the cortex "
        "(node 99), so that node 0 lies at the same anatomy on both sides, and diffusion "
        "metrics were averaged at each node with weights decreasing with distance from the "
        "bundle core (tract profiles; Yeatman et al. 2012); each node's level was named from "
        "its MNI height (the atlas level bands).")
    detection = _get(metrics, "localization", "thresholds") or params.get("localization")
    if _detection_method(detection) == "calibrated":
        windows = [_fmt_num(w) for w in (_get(params, "localization", "window_nodes") or [])]
        model = (_get(metrics, "localization", "statistic", "healthy_model")
                 or _get(params, "localization", "healthy_model", "source"))
        rate = _get(params, "localization", "false_positive_rate")
        sentences.append(
            f"Upper-motor-neuron damage was sought in the FA asymmetry index AI = "
            f"(FA<sub>L</sub> − FA<sub>R</sub>) / (FA<sub>L</sub> + FA<sub>R</sub>) at every "
            f"node (none left out), by a test calibrated to this scan. {N_BOOTSTRAP} bootstrap "
            f"replicates of the profiles (a wild bootstrap of the tensor fit, Whitcher et al. "
            f"2008, with each side's streamlines resampled) gave the scan's own standard error "
            f"of AI at every node, and a model of the left-right asymmetry of healthy CSTs (an "
            f"SD per level"
            + (f"; {_esc(model)}" if model else "")
            + ") added what anatomy and registration contribute. The mean AI over every "
            f"window of {_esc(' and '.join(windows)) or '(not recorded)'} consecutive nodes, "
            f"divided by its standard error, gave a t statistic, and a finding needed the "
            f"largest |t| to exceed the threshold that {val('localization', 'null_draws')} "
            f"simulated healthy profiles of this scan (bootstrap noise plus healthy asymmetry) "
            f"exceed with probability {val('localization', 'false_positive_rate')}: whatever "
            f"its quality, a scan of a healthy subject has a {_esc(_rate_words(rate))} chance "
            f"of a false finding. The p value is the fraction of those simulated profiles with "
            f"a larger |t|; the confidence is high when p is at most a tenth of that rate, "
            f"moderate when at most half of it, and low otherwise. The side with the lower FA "
            f"is reported as affected, the level of the peak is named from its MNI height "
            f"(both levels when it lies within {_fmt_num(BOUNDARY_MARGIN_MM)} mm of the "
            f"boundary between them), and a whole-tract |AI| ≥ "
            f"{val('localization', 'tract_ai')} is reported as notable. The smallest "
            f"detectable FA drop at a level is the relative drop of one side's FA, over the "
            f"best-measured window of the narrowest width lying wholly in that level, whose "
            f"AI would reach the threshold.")
    else:
        sentences.append(
            f"Upper-motor-neuron damage was localised from the FA asymmetry index AI = "
            f"(FA<sub>L</sub> − FA<sub>R</sub>) / (FA<sub>L</sub> + FA<sub>R</sub>): a finding "
            f"needs at least {val('localization', 'min_nodes')} consecutive nodes of one sign "
            f"with |AI| ≥ {val('localization', 'node_ai')} whose mean |AI| is at least "
            f"{val('localization', 'segment_mean_ai')}, the first and last "
            f"{val('localization', 'end_nodes')} nodes being left out; the side with the lower "
            f"FA is reported as affected, and a whole-tract |AI| ≥ "
            f"{val('localization', 'tract_ai')} is reported as notable.")
    cutoff_note = (
        " (this default is cited to both papers but has not yet been checked against their "
        "text; the 2012 algorithm may use another value)"
        if _num(_get(params, "prognosis", "prep_plic_ai")) == prognosis.DEFAULT_PREP_PLIC_AI
        else "")
    sentences.append(
        f"The prognosis statement follows the imaging step of the PREP algorithm (Stinear et "
        f"al. 2007; Stinear et al. 2012) with a PLIC FA asymmetry cut-off of "
        f"{val('prognosis', 'prep_plic_ai')}{cutoff_note}, and requires the patient's "
        f"motor-evoked-potential status to be applied.")
    if isinstance(params.get("qc"), dict):
        sentences.append(
            f"A CST was reported as not assessable when it had fewer than "
            f"{val('qc', 'min_streamlines')} streamlines, when less than "
            f"{pct('qc', 'min_roi_coverage')} of a CST ROI (of each cerebral peduncle: "
            f"{pct('qc', 'min_brainstem_coverage')}) was in the field of view, or when "
            f"the FA correlation with the template was below "
            f"{val('qc', 'min_template_correlation')}.")
    versions = [ver(k, label) for k, label in (
        ("cst-integrity", "cst-integrity"), ("dipy", "DIPY"), ("nibabel", "NiBabel"),
        ("numpy", "NumPy"), ("scipy", "SciPy"), ("nipype", "Nipype"), ("python", "Python"))
        if software.get(k)]
    if _get(choice, "csd_kind") == "msmt" and software.get("cvxpy"):
        versions.insert(-1, f"cvxpy {_esc(software['cvxpy'])}")
    if not software.get("cst-integrity"):
        versions.insert(0, f"cst-integrity {_esc(__version__)}")
    sentences.append("Software: " + ", ".join(versions) + ".")
    if not params:
        sentences.append("<i>No run parameters are recorded in the metrics: the values above "
                         "marked “not recorded” are unknown.</i>")
    return " ".join(sentences)


def _msmt_words(choice, software) -> str:
    """The Methods sentence of multi-shell multi-tissue CSD (``qc.tracking.model_choice``)."""
    def listed(key):
        values = choice.get(key)
        return (", ".join(_esc(_fmt_value(v)) for v in values)
                if isinstance(values, list) and values else "(not recorded)")

    solver = f"cvxpy {_esc(software['cvxpy'])}" if software.get("cvxpy") else "cvxpy"
    return (
        f"Fibre orientation distributions were estimated by multi-shell multi-tissue "
        f"constrained spherical deconvolution (Jeurissen et al., NeuroImage 2014; DIPY, quadratic "
        f"programmes solved with {solver}) of order "
        f"{_esc(_fmt_value(choice.get('sh_order')))} on the b = {listed('shells')} s/mm² "
        f"shells ({listed('directions_per_shell')} directions) and "
        f"{_esc(_fmt_value(choice.get('n_b0')))} b0 volumes, with white-matter, grey-matter "
        f"and CSF responses from the data (from "
        f"{_esc(_fmt_value(choice.get('n_response_voxels')))}, "
        f"{_esc(_fmt_value(choice.get('n_response_voxels_gm')))} and "
        f"{_esc(_fmt_value(choice.get('n_response_voxels_csf')))} voxels chosen by the "
        f"tensor's FA and MD).")


def _tracking_model_used(metrics):
    """The model the tracking used (``csd`` or ``dti``), None when not recorded."""
    return _get(metrics, "qc", "tracking", "model_choice", "model")


def _displayed_parameters(metrics, params) -> dict:
    """The run's parameters as the table shows them: ``tracking.direction`` (the CSD
    getter, probabilistic or deterministic) only applies to CSD, so a tensor run shows how
    it tracked instead of a setting it did not use."""
    tracking = params.get("tracking")
    if not isinstance(tracking, dict) or "direction" not in tracking:
        return params
    used = _tracking_model_used(metrics) or (tracking.get("model")
                                             if tracking.get("model") != "auto" else None)
    if used in (None, "csd"):
        return params
    return {**params, "tracking": {**tracking, "direction": (
        f"deterministic (tensor; --direction {tracking['direction']} applies to CSD only)")}}


def _methods_html(metrics) -> str:
    prov = _get(metrics, "provenance") or {}
    parts = ['<section id="methods"><h2>Methods and provenance</h2>',
             f'<p class="methods">{methods_text(metrics)}</p>']
    if not isinstance(prov, dict) or not prov:
        parts.append(_placeholder("No provenance is recorded in the metrics."))
    else:
        software = prov.get("software")
        if isinstance(software, dict) and software:
            parts.append("<h3>Software versions</h3>" + _kv_table(
                _flatten(software), headers=("Package", "Version")))
        params = prov.get("parameters")
        if isinstance(params, dict) and params:
            parts.append("<h3>Parameters</h3>" + _kv_table(
                _flatten(_displayed_parameters(metrics, params)),
                headers=("Parameter", "Value")))
        inputs = prov.get("inputs")
        if isinstance(inputs, dict) and inputs:
            rows = []
            for name, info in inputs.items():
                if isinstance(info, dict):
                    rows.append(f"<tr><td>{_esc(name)}</td><td><code>{_esc(info.get('path'))}"
                                f"</code></td><td><code>{_esc(info.get('sha256'))}</code></td>"
                                "</tr>")
                else:
                    rows.append(f"<tr><td>{_esc(name)}</td><td colspan=\"2\">"
                                f"<code>{_esc(_fmt_value(info))}</code></td></tr>")
            parts.append("<h3>Inputs</h3><table><thead><tr><th>Input</th><th>Path</th>"
                         "<th>SHA-256</th></tr></thead><tbody>" + "".join(rows)
                         + "</tbody></table>")
        elif isinstance(inputs, list) and inputs:
            parts.append("<h3>Inputs</h3>" + _list_html([_fmt_value(i) for i in inputs]))
        rest = {k: v for k, v in prov.items() if k not in ("software", "parameters", "inputs")}
        if rest:
            parts.append("<h3>Other provenance</h3>" + _kv_table(_flatten(rest)))
    parts.append("<h3>References</h3>" + _list_html(REFERENCES.values(), "refs"))
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------

def _asymmetry_caption(loc, *, band) -> str:
    """Caption (HTML) of the FA asymmetry figure, for the rule the run used.

    Parameters
    ----------
    loc : dict
        The metrics' ``localization``.
    band : bool
        Whether the figure draws the bootstrap ± 2 SE band (calibrated rule).
    """
    thresholds = loc.get("thresholds") if isinstance(loc.get("thresholds"), dict) else {}
    text = ("<b>FA asymmetry index.</b> AI = (FA<sub>L</sub> − FA<sub>R</sub>) / "
            "(FA<sub>L</sub> + FA<sub>R</sub>) per node; positive where the left FA is higher. ")
    if _detection_method(thresholds) == "calibrated":
        if band:
            text += ("Grey band: ± 2 standard errors of AI at each node, from the bootstrap "
                     "(this scan's measurement noise and streamline sampling); where it is "
                     "wide, only a large asymmetry can be found. ")
        widths = " and ".join(_fmt_num(w) for w in thresholds.get("window_nodes") or [])
        test = _calibrated_test_words(loc.get("statistic"))
        return (text + "No fixed |AI| limit applies: the mean AI over every window of "
                + (f"{_esc(widths)} " if widths else "")
                + "consecutive nodes is divided by its standard error (bootstrap plus healthy "
                "asymmetry; see Methods)" + (f", and {_esc(test)}" if test else "")
                + ". Hatched red spans: detected segments.")
    thr, min_nodes = thresholds.get("node_ai"), thresholds.get("min_nodes")
    segment_mean = thresholds.get("segment_mean_ai")
    end_nodes = _num(_ignored_end_nodes(thresholds))
    return (text + (f"± detection threshold |AI| = {_esc(_fmt_num(thr))} (dashed red)"
                    if thr is not None else "No detection threshold recorded")
            + (f"; a finding needs ≥ {_esc(_fmt_num(min_nodes))} consecutive nodes beyond it"
               if min_nodes is not None else "")
            + (f" with a mean |AI| ≥ {_esc(_fmt_num(segment_mean))}"
               if min_nodes is not None and segment_mean is not None else "")
            + ". Hatched red spans: detected segments."
            + (f" Grey dotted spans: the {_esc(_fmt_num(end_nodes))} nodes at each end that "
               "detection leaves out (streamlines fan out into the cortex, or end at the "
               "brainstem landmark)." if math.isfinite(end_nodes) and end_nodes >= 1 else "")
            + " Healthy CSTs stay within a few hundredths.")


def _tracts_center(streamlines):
    pts = [_all_points(streamlines[s]) for s in SIDES]
    pts = [p for p in pts if len(p)]
    if not pts:
        return None
    return np.concatenate(pts).mean(axis=0)


def _valid_peak(peak):
    if peak is None:
        return None
    try:
        arr = np.asarray(peak, dtype=float).ravel()
    except (TypeError, ValueError):
        return None
    return arr[:3] if arr.size >= 3 and np.all(np.isfinite(arr[:3])) else None


def build_report_html(*, metrics, profiles_tsv, fa_file, tract_files, mask_file=None,
                      rois_file=None, v1_file=None, template_in_subject_file=None,
                      n_jobs=1) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    figures = []
    pending = _PENDING_FIGURES.set(figures)
    try:
        page = _report_page(metrics=metrics, profiles_tsv=profiles_tsv, fa_file=fa_file,
                            tract_files=tract_files, mask_file=mask_file, rois_file=rois_file,
                            v1_file=v1_file, template_in_subject_file=template_in_subject_file)
    finally:
        _PENDING_FIGURES.reset(pending)
    for index, figure_html in enumerate(draw_figures(figures, n_jobs=n_jobs)):
        page = page.replace(_figure_slot(index), figure_html, 1)
    return page


def _report_page(*, metrics, profiles_tsv, fa_file, tract_files, mask_file, rois_file, v1_file,
                 template_in_subject_file) -> str:
    """The page with a slot for each figure (:func:`build_report_html` fills them)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    notes = []
    fa_img = _load_image(fa_file, "FA image", notes)
    mask_img = _load_image(mask_file, "brain mask", notes) if mask_file is not None else None
    rois_img = _load_image(rois_file, "ROI image", notes) if rois_file is not None else None
    v1_img = (_load_vectors(v1_file, "principal-eigenvector (V1) image", notes)
              if v1_file is not None else None)
    template_img = (_load_image(template_in_subject_file, "template-in-subject image", notes)
                    if template_in_subject_file is not None else None)
    streamlines, counts = _load_tracts(tract_files, notes)

    profiles = {}
    if profiles_tsv is None:
        notes.append("No profiles TSV was given.")
    elif not Path(profiles_tsv).exists():
        notes.append(f"The profiles TSV is missing: {Path(profiles_tsv).name}.")
    else:
        try:
            profiles = read_profiles_tsv(profiles_tsv)
            for side in SIDES:
                if side not in profiles:
                    notes.append(f"The profiles TSV has no {TRACT_NAMES[side]} rows.")
                elif not np.isfinite(profiles[side]["fa"]).any():
                    notes.append(f"The {TRACT_NAMES[side]} profile has no FA values.")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"The profiles TSV could not be read ({exc}).")
    if not isinstance(metrics.get("localization"), dict):
        notes.append("The metrics have no localisation result.")

    loc = _get(metrics, "localization") or {}
    segments = [s for s in (loc.get("segments") or []) if isinstance(s, dict)]
    peak = _valid_peak(loc.get("peak_ras_mm")) if loc.get("umn_damage") else None
    peak_node = loc.get("peak_node") if loc.get("umn_damage") else None
    thresholds = loc.get("thresholds") if isinstance(loc.get("thresholds"), dict) else {}

    subject = metrics.get("subject")
    label = _entities_label(subject, metrics.get("entities")) or "unknown subject"
    created = _get(metrics, "provenance", "created") or datetime.now(UTC).isoformat(
        timespec="seconds")

    # ---- figures ----
    figs = []
    center = peak if peak is not None else _tracts_center(streamlines)
    sagittal_x, sagittal_side = None, None
    if center is None and fa_img is not None:
        fa_box = _world_bbox(fa_img, _volume(fa_img), 0.02)
        center = fa_box.mean(axis=1)
    if peak is None and center is not None:
        # Through the tracts' centre the sagittal plane would be the midline, between the
        # tracts: cut through the left CST (or the right one) instead.
        for side in SIDES:
            pts = _all_points(streamlines[side])
            if len(pts):
                sagittal_x, sagittal_side = float(np.median(pts[:, 0])), side
                break
    if center is None:
        slices_html = _placeholder("No FA image and no streamlines: the tract slices cannot be "
                                   "drawn.")
    else:
        missing_bits = [n for n in notes if "FA image" in n or "tract" in n.lower()]
        where = ("through the peak of the FA asymmetry (red ring)" if peak is not None
                 else "through the centre of the tracts (no asymmetry peak was found)")
        caption = (f"<b>CST reconstruction.</b> World-aligned FA slices {where}; CST_L "
                   f"<span style=\"color:{COLORS['left']}\">■</span> and CST_R "
                   f"<span style=\"color:{COLORS['right']}\">■</span> streamline points within "
                   f"±4 mm of each plane are overlaid. Neurological convention: the subject's "
                   f"left is on the image left; orientation letters L/R, A/P, S/I mark the "
                   f"world (RAS) directions.")
        if peak is None and sagittal_x is not None:
            caption += (f" The sagittal plane cuts through the {TRACT_NAMES[sagittal_side]} "
                        f"(x = {_fmt_mm(sagittal_x)} mm), not the midline.")
        if missing_bits:
            caption += " <b>Missing:</b> " + _esc(" ".join(missing_bits))
        slices_html = _render_figure(
            lambda: plot_tract_slices(fa_img, streamlines, center=center, peak=peak,
                                      sagittal_x=sagittal_x),
            caption, "CST tract slices")
    figs.append(("CST on FA slices", slices_html))

    if v1_img is None:
        color_html = _placeholder("Colour FA not available: " + next(
            (n for n in notes if "V1" in n),
            "no principal-eigenvector (V1) image was given."))
    elif fa_img is None or center is None:
        color_html = _placeholder("Colour FA not available: no FA image.")
    else:
        color_html = _render_figure(
            lambda: plot_color_fa(fa_img, v1_img, streamlines, center=center,
                                  sagittal_x=sagittal_x),
            "<b>Directionally encoded colour FA.</b> Colour = |principal diffusion direction "
            "in world coordinates| × FA: red left–right, green anterior–posterior, blue "
            "inferior–superior; same planes as above. The CST should run through blue "
            "(inferior–superior) white matter in the brainstem and internal capsule. Outlines: "
            "streamline points of CST_L (orange, solid) and CST_R (blue, dashed) within ±4 mm "
            "of each plane. A CST outline on green or red tissue, or a brainstem that is not "
            "blue, suggests a gradient-direction (b-vector) error.",
            "Colour FA with CST outlines")
    figs.append(("Colour FA (principal direction)", color_html))

    have_points = any(len(streamlines[s]) for s in SIDES)
    figs.append(("Glass brain", _render_figure(
        lambda: plot_glass_brain(streamlines, mask_img=mask_img, fa_img=fa_img),
        "<b>Glass brain.</b> All streamline points of CST_L (orange) and CST_R (blue) "
        "projected through the whole brain (track density, log scale; darker = more "
        "streamlines) over the outline of the brain"
        + (" mask" if mask_img is not None else " (FA &gt; 0.02)") + ". The two CSTs would "
        "hide each other in a sagittal projection, so each has its own sagittal panel "
        "(anterior on the right). Each CST should run from the brainstem up through the "
        "internal capsule to the motor cortex of its own hemisphere, without crossing the "
        "midline above the brainstem. Neurological convention: the subject's left is on the "
        "image left.",
        "Glass-brain projection of the CSTs",
        missing=None if have_points else "Glass brain not available: no streamlines.")))

    levels = _band_levels(profiles)
    have_fa = any(np.isfinite(profiles[s]["fa"]).any() for s in profiles)
    figs.append(("FA profiles", _render_figure(
        lambda: plot_profiles(profiles, metric="fa", segments=segments, peak_node=peak_node,
                              ylabel="FA"),
        "<b>FA profiles.</b> Fractional anisotropy along the left (orange) and right (blue) "
        "CST, from the brainstem (node 0) to the cortex (node 99). Background bands show the "
        "anatomical level of each node (from the <code>level</code> column); hatched red spans "
        "are the segments detected as asymmetric; the dashed red line is the peak node.",
        "FA profiles", missing=None if have_fa else "FA profiles not available: "
        + (" ".join(n for n in notes if "profile" in n.lower() or "TSV" in n) or "no data."))))

    ai = _get(metrics, "asymmetry", "fa_ai_profile")
    if not ai and "left" in profiles and "right" in profiles:
        left, right = profiles["left"]["fa"], profiles["right"]["fa"]
        n = min(len(left), len(right))
        with np.errstate(invalid="ignore", divide="ignore"):
            total = left[:n] + right[:n]
            ai = np.where(total > 0, (left[:n] - right[:n]) / total, np.nan).tolist()
    calibrated = _detection_method(thresholds) == "calibrated"
    # The calibrated rule has no |AI| line: its band is the scan's own uncertainty.
    thr = None if calibrated else thresholds.get("node_ai")
    se = _get(metrics, "asymmetry", "fa_ai_profile_se") if calibrated else None
    ai_ok = bool(ai) and any(math.isfinite(_num(v)) for v in ai)
    end_nodes = _ignored_end_nodes(thresholds)
    figs.append(("FA asymmetry", _render_figure(
        lambda: plot_asymmetry_profile(ai, threshold=thr, se=se, segments=segments,
                                       levels=levels, peak_node=peak_node, end_nodes=end_nodes),
        _asymmetry_caption(loc, band=bool(se)),
        "FA asymmetry profile", missing=None if ai_ok else "FA asymmetry profile not available "
        "(no AI profile in the metrics and no left/right FA profiles).")))

    have_diff = any(np.isfinite(profiles[s][m]).any() for s in profiles
                    for m in ("md", "rd", "ad"))
    figs.append(("Diffusivity profiles", _render_figure(
        lambda: plot_diffusivity_profiles(profiles, segments=segments),
        "<b>Diffusivity profiles.</b> Mean (MD), radial (RD) and axial (AD) diffusivity "
        "along the left (orange) and right (blue) CST. Wallerian degeneration typically raises "
        "RD and MD where FA drops.",
        "Diffusivity profiles",
        missing=None if have_diff else "Diffusivity profiles not available.")))

    # ---- assemble ----
    notes_html = ""
    if notes:
        notes_html = ('<div class="alert"><b>Missing or incomplete inputs</b> — the report '
                      "shows what is available:" + _list_html(notes) + "</div>")
    figures_html = "".join(f"<h3>{_esc(t)}</h3>{h}" for t, h in figs)
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>CST integrity report: {_esc(label)}</title><style>{_CSS}</style></head>")
    nav = ('<nav><a href="#top">Top</a><a href="#verdict">Verdict</a>'
           '<a href="#prognosis">Prognosis</a><a href="#figures">Figures</a>'
           '<a href="#qc">Quality control</a><a href="#methods">Methods</a></nav>')
    body = [
        head, "<body>", nav, '<main id="top">',
        f"<h1>CST integrity report: {_esc(label)}</h1>",
        f'<p class="subtitle">Subject <b>{_esc(subject or "unknown")}</b>'
        + "".join(f" · {_esc(k)}: <b>{_esc(v)}</b>"
                  for k, v in (metrics.get("entities") or {}).items()
                  if isinstance(metrics.get("entities"), dict))
        + f" · generated {_esc(created)} · cst-integrity {_esc(__version__)}</p>",
        '<div class="banner">Research use only — not a medical device'
        "<small>Not for diagnosis or treatment decisions. Findings must be interpreted by a "
        "qualified clinician together with the clinical examination.</small></div>",
        notes_html,
        _verdict_html(metrics),
        _prognosis_html(metrics),
        '<section id="figures"><h2>Figures</h2>', figures_html, "</section>",
        _qc_html(metrics, counts, fa_img, mask_img, rois_img, notes, template_img),
        _methods_html(metrics),
        f"<footer>cst-integrity {_esc(__version__)} · {_esc(DISCLAIMER)}</footer>",
        "</main></body></html>\n",
    ]
    return "".join(body)


def write_report(out_html, *, metrics: dict, profiles_tsv, fa_file, tract_files: dict,
                 mask_file=None, rois_file=None, v1_file=None,
                 template_in_subject_file=None, n_jobs=1) -> Path:
    """Write the self-contained HTML report, atomically; return its path.

    Parameters
    ----------
    out_html : path of the HTML file to write (its folder is created)
    metrics : the metrics dict (``pipeline.steps.assess``); any key may be missing
    profiles_tsv : path of the profiles TSV (``tract, node, fa, md, rd, ad, x, y, z, level``)
    fa_file : subject FA NIfTI, any storage orientation
    tract_files : {"left": path, "right": path} of tractograms (world RAS mm)
    mask_file, rois_file : optional brain mask and CST ROI label NIfTIs (subject space)
    v1_file : optional principal eigenvector, 4D X×Y×Z×3 in the voxel-axis frame (DIPY's
        ``evecs[..., 0]``); gives the colour-FA figure (skipped with a note if None)
    template_in_subject_file : optional template brain mask or template FA resampled on
        the subject grid (warped by the registration); gives the registration figure
        (skipped with a note if None)
    n_jobs : processes drawing the figures (:func:`draw_figures`; same page for any value)

    Any input may be None, missing or empty: the report still renders and says so.
    """
    text = build_report_html(metrics=metrics, profiles_tsv=profiles_tsv, fa_file=fa_file,
                             tract_files=tract_files, mask_file=mask_file, rois_file=rois_file,
                             v1_file=v1_file, template_in_subject_file=template_in_subject_file,
                             n_jobs=n_jobs)
    return write_text(out_html, text)
