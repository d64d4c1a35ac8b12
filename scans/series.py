"""What ITK does not check in a scan file before reading it: that a DICOM series is a CT whose slices are evenly
spaced (ITK reads a series with a missing slice at a wrong spacing, with a warning), and how many NaN or infinite
values a float NIfTI holds (ITK's NIfTI reader turns them into 0, which then passes for water)."""
import gzip
import os

import numpy as np
import SimpleITK as sitk

from scans.hu import non_finite
from scans.luna import ScanError

SLICE_TOL = 0.02  # slice gaps further than this share of the usual gap from it are missing or uneven slices
NIFTI_FLOATS = {16: 'f4', 64: 'f8'}  # NIfTI datatype codes of the float types -> numpy type


def slice_info(path):
    """(Modality or '', position of the slice along its normal in mm, or None without the tags) of a DICOM file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()

    def tag(key):
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ''
    modality = tag('0008|0060').upper()
    try:
        position = np.array(tag('0020|0032').split('\\'), dtype=float)
        cosines = np.array(tag('0020|0037').split('\\'), dtype=float)
    except ValueError:
        return modality, None
    if position.shape != (3,) or cosines.shape != (6,):
        return modality, None
    return modality, float(position @ np.cross(cosines[:3], cosines[3:]))


def check_series(files, folder, series):
    """ScanError when the DICOM files of a series are not a CT (Modality tag) or not a volume of evenly spaced
    slices: a single slice, slices at one position, missing or unevenly spaced slices (each named by position)."""
    infos = [slice_info(f) for f in files]
    where = f'{folder}: DICOM series {series}'
    modalities = sorted({m for m, _ in infos if m})
    if modalities and modalities != ['CT']:
        raise ScanError(f'{where} is not a CT (Modality {", ".join(modalities)}): the models read the Hounsfield '
                        'units of a CT of the chest')
    if len(files) < 2:
        raise ScanError(f'{where} holds a single 2-D slice ({os.path.basename(files[0])}): a 3-D CT volume of many '
                        'slices is needed')
    positions = np.array([p for _, p in infos if p is not None])
    if len(positions) < len(files):
        return  # no positions to check: left to ITK
    positions = np.sort(positions)
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 0:
        raise ScanError(f'{where}: its {len(files)} slices lie at {len(np.unique(positions))} position(s) (two '
                        'series in one, or copies of the same slices?): give one volume of distinct slices')
    odd = np.flatnonzero(np.abs(gaps - step) > SLICE_TOL * step)
    if not len(odd):
        return
    ratio = gaps / step
    whole = np.abs(ratio - np.round(ratio)) <= SLICE_TOL  # a gap of k steps: k - 1 slices missing
    missing = [f'{positions[i] + step * k:.4g}' for i in odd if whole[i] for k in range(1, int(round(ratio[i])))]
    uneven = [f'{positions[i]:.4g} -> {positions[i + 1]:.4g}' for i in odd if not whole[i] or ratio[i] < 0.5]
    what = [f'{len(missing)} slice(s) missing at {listed(missing)} mm'] if missing else []
    what += [f'uneven gaps between {listed(uneven)} mm'] if uneven else []
    raise ScanError(f'{where}: its {len(files)} slices are not evenly spaced ({step:.4g} mm apart, positions '
                    f'{positions[0]:.4g}..{positions[-1]:.4g} mm along the slice normal): {"; ".join(what)}; '
                    'give the complete series')


def listed(items, most=5):
    return ', '.join(items[:most]) + (' ...' if len(items) > most else '')


def nifti_non_finite(path):
    """non_finite's text for the voxels of a float NIfTI-1 file (.nii or .nii.gz), read from its bytes ('' for
    another type, or a file this cannot parse: left to ITK)."""
    opener = gzip.open if path.lower().endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            header = f.read(348)
            if len(header) < 348:
                return ''
            order = '<' if np.frombuffer(header[:4], '<i4')[0] == 348 else '>'
            if np.frombuffer(header[:4], order + 'i4')[0] != 348:
                return ''  # NIfTI-2 or not NIfTI
            dims = np.frombuffer(header[40:56], order + 'i2')
            dtype = NIFTI_FLOATS.get(int(np.frombuffer(header[70:72], order + 'i2')[0]))
            offset = int(np.frombuffer(header[108:112], order + 'f4')[0])
            if dtype is None or not 1 <= dims[0] <= 7 or offset < 348:
                return ''
            f.read(offset - 348)
            count = int(np.prod(dims[1:dims[0] + 1].astype(np.int64)))
            values = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), order + dtype)
    except (OSError, EOFError, ValueError):
        return ''
    return non_finite(values.reshape(dims[1:dims[0] + 1][::-1])) if len(values) == count else ''
