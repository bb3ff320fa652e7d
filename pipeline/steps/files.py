"""Reading and writing the intermediate files that pass between stages."""

import nibabel as nib
import numpy as np

from ..io import outputs
from ..io.dwi import load_dwi


def load_array(path, dtype=np.float32):
    """An image as (array of ``dtype``, nibabel image)."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=dtype), img


def load_scan(dwi_file, bval_file, bvec_file, b0_threshold):
    """A pipeline intermediate (or the input) as (DwiScan, float32 data)."""
    scan = load_dwi(dwi_file, bval_file, bvec_file, b0_threshold=b0_threshold, check_data=False)
    return scan, scan.img.get_fdata(dtype=np.float32)


def write_bvecs(path, bvecs_fsl):
    """FSL b-vector file (three rows)."""
    with outputs.atomic_path(path) as tmp:
        np.savetxt(tmp, np.asarray(bvecs_fsl).T, fmt="%.8f")
    return path
