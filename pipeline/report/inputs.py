"""Loading the images and tractograms a report shows.

Nothing here raises on a missing or unreadable file: it returns None (or nothing) and
appends a sentence to ``notes``, which the report lists, so that a report always renders.
"""

from pathlib import Path

import nibabel as nib
import numpy as np

from ..cst import SIDES, TRACT_NAMES


def load_image(path, what, notes):
    """The 3D (or 4D) image at ``path``, or None plus a note naming ``what`` is missing."""
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


def image_volume(img, dtype=np.float32):
    """The image's data as a 3D array (the first volume of a 4D image)."""
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    return np.asarray(data, dtype=dtype)


def load_vectors(path, what, notes):
    """A 4D X×Y×Z×3 vector image, or None plus a note."""
    img = load_image(path, what, notes)
    if img is None:
        return None
    if len(img.shape) != 4 or img.shape[3] != 3:
        notes.append(f"The {what} file is not an X×Y×Z×3 vector image "
                     f"({Path(path).name}: shape {tuple(img.shape)}).")
        return None
    return img


def load_tracts(tract_files, notes):
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
