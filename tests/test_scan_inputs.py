"""Files that are not a chest CT volume are refused, each in one line saying what it is and what is needed: a single
2-D slice, a DICOM series with a missing or unevenly spaced slice (without ITK's own warning), a series that is not
a CT, values that are not Hounsfield units, NaN or infinite voxels (also where ITK's NIfTI reader would turn them
into 0). Scans built with SimpleITK and numpy in tmp_path."""
import locale
import os

import numpy as np
import pytest
import SimpleITK as sitk
from test_prepare import make_scan
from test_scan_predict import SERIES_UID, write_dicom_series

from scans import lungmask
from scans.luna import ScanError


def phantom(tmp_path, name='scan.mhd'):
    """The phantom of test_prepare (air, body, two lungs) as an sitk image of HU, written to tmp_path/name."""
    path = str(tmp_path / name)
    make_scan(path, size=(48, 48, 12), spacing=(2.5, 2.5, 5.0), nodules=())
    return sitk.ReadImage(path)


def refused(path, match, **kw):
    with pytest.raises(ScanError, match=match) as info:
        lungmask.read_scan(str(path), **kw)
    assert '\n' not in str(info.value)
    return str(info.value)


def test_a_single_slice_says_a_volume_is_needed_and_how_many_slices(tmp_path):
    image = phantom(tmp_path)
    sitk.WriteImage(image[:, :, 5:6], str(tmp_path / 'slice.nii.gz'))
    refused(tmp_path / 'slice.nii.gz', r'slice.nii.gz is a single 2-D slice of 48 x 48 pixels: a 3-D CT volume .* '
            r'is needed')
    sitk.WriteImage(image[:, :, 5], str(tmp_path / 'plane.nii.gz'))  # stored as a 2-D image
    refused(tmp_path / 'plane.nii.gz', r'plane.nii.gz is a 2-D image of 48 x 48 pixels: a 3-D CT volume')
    write_dicom_series(image[:, :, 5:6], str(tmp_path / 'one'))
    refused(tmp_path / 'one', r'DICOM series .* holds a single 2-D slice \(0000.dcm\): a 3-D CT volume of many '
            'slices is needed')


def test_missing_and_uneven_slices_are_named_without_itk_warning(tmp_path, capfd):
    image = phantom(tmp_path)  # slices 5 mm apart
    folder = tmp_path / 'gap'
    write_dicom_series(image, str(folder))
    z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(12)]
    os.remove(folder / '0004.dcm')
    os.remove(folder / '0005.dcm')
    capfd.readouterr()
    refused(folder, rf'its 10 slices are not evenly spaced \(5 mm apart, positions {z[0]:g}..{z[-1]:g} mm along the '
            rf'slice normal\): 2 slice\(s\) missing at {z[4]:g}, {z[5]:g} mm; give the complete series')
    assert capfd.readouterr().err == ''  # no raw ITK warning with its build path
    for name, k in (('uneven', 7.4), ('jitter', 7.01)):  # slice 7 moved by 2 mm, or by 0.05 mm (accepted)
        write_dicom_series(image, str(tmp_path / name))
        move_slice(tmp_path / name / '0007.dcm', image.TransformContinuousIndexToPhysicalPoint((0, 0, k)))
    refused(tmp_path / 'uneven', rf'uneven gaps between {z[6]:g} -> {z[7] + 2:g}, {z[7] + 2:g} -> {z[8]:g} mm')
    capfd.readouterr()
    hu, _ = lungmask.read_scan(str(tmp_path / 'jitter'))
    assert hu.shape == (12, 48, 48)
    assert capfd.readouterr().err == ''  # ITK's warning of non-uniform sampling is not shown


def move_slice(path, position):
    """Rewrite a DICOM file with another Image Position (Patient)."""
    moved = sitk.ReadImage(str(path))
    moved.SetMetaData('0020|0032', '\\'.join(f'{v:.4f}' for v in position))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the C locale (ASCII files)
    try:
        writer.Execute(moved)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_a_series_that_is_not_ct_is_refused(tmp_path):
    image = phantom(tmp_path)
    folder = tmp_path / 'mr'
    write_dicom_series(image, str(folder), modality='MR')
    refused(folder, rf'mr: DICOM series {SERIES_UID} is not a CT \(Modality MR\)')


def test_values_that_are_not_hounsfield_units_are_refused(tmp_path):
    image = phantom(tmp_path)
    # a CT stored without its rescale intercept: air near 24
    raw = sitk.Cast(sitk.Clamp(image + 1024, lowerBound=0), sitk.sitkUInt16)
    sitk.WriteImage(raw, str(tmp_path / 'raw.nii.gz'))
    refused(tmp_path / 'raw.nii.gz', r'raw.nii.gz: its values are not the Hounsfield units of a CT: 0.0% of its '
            r'voxels are at or below -900 HU .*\(an MR, or a CT stored without its rescale slope and intercept')
    mr = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 900, (12, 48, 48)).astype(np.float32))
    sitk.WriteImage(mr, str(tmp_path / 'mr.mhd'))
    refused(tmp_path / 'mr.mhd', 'not the Hounsfield units of a CT')
    hu, _ = lungmask.read_scan(str(tmp_path / 'scan.mhd'))  # the phantom itself is read
    assert hu.shape == (12, 48, 48)


@pytest.mark.parametrize('suffix', ['.mhd', '.nii.gz', '.nii'])
def test_non_finite_voxels_are_counted_and_refused(tmp_path, suffix):
    hu = sitk.GetArrayFromImage(phantom(tmp_path)).astype(np.float32)
    hu[6, 20, 20:23] = np.nan  # inside the right lung
    hu[7, 1, 1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(tmp_path / f'nan{suffix}'))
    refused(tmp_path / f'nan{suffix}', r'nan.* 4 of 27648 voxels are not finite numbers \(3 NaN, 1 infinite; the '
            r'first at voxel \(z, y, x\) \[6, 20, 20\]\): replace them \(e.g. with -1000 HU, air\) and rerun')
