"""predict.py --SCAN: one synthetic scan written as .mhd/.raw, .nii.gz (also with its z axis stored reversed) and a
DICOM series gives the same cubes (nodule at the centre) and probabilities; a LUNA16-format scan gives the
probabilities of predict.py on the cube set that prepare.py + nodclsgbt.py build from it; bad input is one line
and writes nothing."""
import locale
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from test_predict import RETRAIN, cubes, finished  # noqa: F401 - the tiny finished retrain run (module fixtures)
from test_prepare import SMALL_LUNGS, make_scan, write_csv

import nodclsgbt
import predict
import prepare
from utils import UserError

# mm from the phantom's centre: one in each lung, and one on the right lung's outer wall (x 49 mm), where the
# masking would fill it (bright voxels in the ring around the lung) were it not protected
NODULES = ((34.0, 3.0, 8.0), (-30.0, -10.0, -12.0), (50.0, -3.0, 0.0))
SERIES_UID = '1.2.826.0.1.3680043.2.1125.1.7'


def write_dicom_series(image, folder, series_uid=SERIES_UID, modality='CT'):
    """One 2-D DICOM file per slice of a 3-D image of HU: Modality, Image Position / Orientation (Patient), Pixel
    Spacing, Slice Thickness, and the HU stored as unsigned 16 bit with Rescale Intercept -2048 and Slope 1."""
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the C locale (ASCII files)
    try:
        _write_slices(image, folder, series_uid, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(image, folder, series_uid, modality):
    os.makedirs(folder, exist_ok=True)
    d, (sx, sy, sz) = image.GetDirection(), image.GetSpacing()
    hu = sitk.Cast(image, sitk.sitkFloat32)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        tags = {'0008|0060': modality, '0020|000d': series_uid + '.0', '0020|000e': series_uid,
                '0008|0018': f'{series_uid}.{k + 1}', '0020|0013': str(k + 1),
                '0020|0032': '\\'.join(f'{v:.4f}' for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                '0020|0037': '\\'.join(f'{v:.6f}' for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                '0028|0030': f'{sy:g}\\{sx:g}', '0018|0050': f'{sz:g}', '0028|1052': '-2048', '0028|1053': '1',
                '0028|0100': '16', '0028|0101': '16', '0028|0102': '15', '0028|0103': '0'}
        plane = hu[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f'{k:04d}.dcm'))
        writer.Execute(plane)


def write_demo_scans(folder):
    """The phantom of test_prepare (two lungs, a bright 8 mm nodule in each) as a LUNA16 tree
    (luna16/subset0/demo.mhd), demo.nii.gz, demo_zdown.nii.gz (the same voxels stored with z reversed),
    the DICOM series dicom/, and nodules.csv (world centres, no label). Returns the world centres (x, y, z)."""
    os.makedirs(os.path.join(folder, 'luna16', 'subset0'), exist_ok=True)
    mhd = os.path.join(folder, 'luna16', 'subset0', 'demo.mhd')
    world, _ = make_scan(mhd, nodules=NODULES, flip=True)
    image = sitk.ReadImage(mhd)
    sitk.WriteImage(image, os.path.join(folder, 'demo.nii.gz'))
    zdown = sitk.Flip(image, [False, False, True])  # same world positions, z index running the other way
    assert zdown.GetDirection()[8] == -1
    sitk.WriteImage(zdown, os.path.join(folder, 'demo_zdown.nii.gz'))
    write_dicom_series(image, os.path.join(folder, 'dicom'))
    write_csv(os.path.join(folder, 'nodules.csv'),
              [{'nodule_id': f'n{k}', 'coordX': round(w[0], 3), 'coordY': round(w[1], 3), 'coordZ': round(w[2], 3),
                'diameter_mm': 8.0} for k, w in enumerate(world)])
    return world


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('demo_scan'))
    return folder, write_demo_scans(folder)


def score(run, scan, table, **kw):
    return predict.main(RUN=run, SCAN=scan, AT=table, DEVICE='cpu', LUNG_ML=SMALL_LUNGS, **kw)


def test_three_formats_give_the_same_cubes_and_probabilities(finished, demo):  # noqa: F811
    folder, _ = demo
    table = os.path.join(folder, 'nodules.csv')
    scans = {'mhd': os.path.join(folder, 'luna16', 'subset0', 'demo.mhd'), 'nii': os.path.join(folder, 'demo.nii.gz'),
             'zdown': os.path.join(folder, 'demo_zdown.nii.gz'), 'dicom': os.path.join(folder, 'dicom')}
    out = {k: score(finished, path, table) for k, path in scans.items()}
    ref = out['mhd']
    pred = ref['predictions']
    assert pred['nodule_id'].tolist() == ['n0', 'n1', 'n2']
    assert {'prob_fold8', 'prob_fold9', 'prob_mean', 'prob_std', 'voxel_z', 'seriesuid'} <= set(pred.columns)
    np.testing.assert_allclose(pred['prob_std'], np.abs(pred['prob_fold8'] - pred['prob_fold9']) / 2, rtol=1e-6)
    for nid in ('n0', 'n1', 'n2'):
        cube = np.load(os.path.join(ref['run'], 'cubes', f'{nid}.npy'))
        assert cube.shape == (8, 8, 8)
        bright = np.argwhere(cube > 215)  # the 400 HU sphere -> 227; the nodule's centre is voxel 4 (size // 2)
        assert len(bright) > 50 and np.abs(bright.mean(0) - 4).max() < 1.0, nid
        for k in ('nii', 'zdown', 'dicom'):
            other = np.load(os.path.join(out[k]['run'], 'cubes', f'{nid}.npy'))
            assert np.abs(other.astype(int) - cube).max() <= 1, k  # NIfTI keeps spacing as float32: rounding
    for k in ('nii', 'zdown', 'dicom'):
        np.testing.assert_allclose(out[k]['predictions']['prob_mean'], pred['prob_mean'], atol=2e-3)
    assert not os.path.exists(os.path.join(ref['run'], predict.INCOMPLETE))


def test_luna16_scan_equals_the_cube_set_of_prepare_and_nodclsgbt(finished, demo, tmp_path):  # noqa: F811
    folder, world = demo
    labels = [{'seriesuid': 'demo', 'coordX': w[0], 'coordY': w[1], 'coordZ': w[2], 'diameter_mm': 8.0,
               'label': k % 2} for k, w in enumerate(world)]
    write_csv(str(tmp_path / 'labels.csv'), labels)
    prepare.main(LUNA16_DIR=os.path.join(folder, 'luna16'), OUT_DIR=str(tmp_path / 'prep'),
                 LABEL_TABLE=str(tmp_path / 'labels.csv'), WORKERS=1, START_METHOD='fork', LUNG_ML=SMALL_LUNGS,
                 RUNS=str(tmp_path / 'runs'))
    nodclsgbt.crop_cube_set(str(tmp_path / 'prep'), str(tmp_path / 'set'), 16, print)
    trained = predict.main(RUN=finished, DATA=str(tmp_path / 'set'), DEVICE='cpu')['predictions']
    new = score(finished, os.path.join(folder, 'luna16', 'subset0', 'demo.mhd'), str(tmp_path / 'labels.csv'))
    new = new['predictions']
    assert trained['nodule_id'].tolist() == new['nodule_id'].tolist() == ['own00000', 'own00001', 'own00002']
    for col in ('prob_fold8', 'prob_fold9', 'prob_mean'):
        np.testing.assert_allclose(new[col], trained[col], rtol=1e-6, atol=1e-7)
    assert new['label'].tolist() == [0, 1, 0]  # a label given in the table is carried along, not needed


def test_several_scans_by_file_column(finished, demo, tmp_path):  # noqa: F811
    folder, _ = demo
    scans = tmp_path / 'scans'
    scans.mkdir()
    shutil.copy(os.path.join(folder, 'demo.nii.gz'), scans / 'a.nii.gz')
    shutil.copytree(os.path.join(folder, 'dicom'), scans / 'b')
    rows = pd.read_csv(os.path.join(folder, 'nodules.csv')).to_dict('records')
    table = [dict(rows[0], nodule_id='a0', file='a.nii.gz'), dict(rows[1], nodule_id='b1', file='b')]
    write_csv(str(tmp_path / 'at.csv'), table)
    pred = score(finished, str(scans), str(tmp_path / 'at.csv'))['predictions']
    assert pred[['nodule_id', 'seriesuid']].values.tolist() == [['a0', 'a'], ['b1', 'b']]
    single = score(finished, os.path.join(folder, 'dicom'), os.path.join(folder, 'nodules.csv'))['predictions']
    np.testing.assert_allclose(pred['prob_mean'], single['prob_mean'][:2], atol=2e-3)  # a0 from NIfTI, b1 DICOM


def refused(run, scan, table, match, tmp_path, **kw):
    before = set(os.listdir(run))
    with pytest.raises(UserError, match=match):
        score(run, scan, table, **kw)
    assert set(os.listdir(run)) == before  # nothing written


def test_bad_input_is_one_line_and_writes_nothing(finished, demo, tmp_path):  # noqa: F811
    folder, world = demo
    nii = os.path.join(folder, 'demo.nii.gz')
    outside = str(tmp_path / 'outside.csv')
    write_csv(outside, [{'coordX': world[0][0], 'coordY': world[0][1], 'coordZ': world[0][2] + 60, 'diameter_mm': 8},
                        {'coordX': world[1][0], 'coordY': world[1][1], 'coordZ': world[1][2], 'diameter_mm': 8}])
    refused(finished, nii, outside, r'1 of 2 nodules outside the scan or within their radius of its edge: line 2 '
            r'\(nodule own00000, scan demo\): .* is outside the scan', tmp_path)
    two = tmp_path / 'two'
    shutil.copytree(os.path.join(folder, 'dicom'), two)
    write_dicom_series(sitk.ReadImage(nii)[:, :, :5], str(two / 'other'), SERIES_UID + '.2')
    for f in os.listdir(two / 'other'):
        os.rename(two / 'other' / f, two / f'other{f}')
    table = os.path.join(folder, 'nodules.csv')
    refused(finished, str(two), table, rf'holds 2 DICOM series: {SERIES_UID} \(40 files\), {SERIES_UID}.2 \(5 files\); '
            'choose one with --SERIES=<id>', tmp_path)
    pred = score(finished, str(two), table, SERIES=SERIES_UID)['predictions']  # the series chosen: scored
    assert len(pred) == 3
    garbage = tmp_path / 'garbage.nii.gz'
    garbage.write_bytes(os.urandom(3000))
    refused(finished, str(garbage), table, r'SCAN .*garbage.nii.gz: bad header: Unable to determine', tmp_path)
    refused(finished, str(tmp_path / 'nowhere.nii'), table, r'SCAN=.*nowhere.nii does not exist', tmp_path)
    with pytest.raises(UserError, match='AT is the nodule table of SCAN'):
        predict.main(RUN=finished, AT=table, DEVICE='cpu')
    with pytest.raises(UserError, match='SCAN needs AT='):
        predict.main(RUN=finished, SCAN=nii, DEVICE='cpu')


def test_scan_modules_import_no_torch():
    """The preprocessing of a new scan runs in plain numpy / SimpleITK processes (the scan workers' rule)."""
    import subprocess
    import sys
    code = 'import sys, scans.cubes; print("torch" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == 'False', out.stderr


def test_a_lung_mask_found_only_with_a_widened_lung_ml_is_flagged(finished, tmp_path, monkeypatch):  # noqa: F811
    """Lungs cut to 14 mm either side of the centre plane (~55 ml each, less than the default LUNG_ML's 100 ml):
    refused at the default; with LUNG_ML=(20, 8200) scored, and the warning is in the log, in predictions.csv and
    in the LayerCAM figure's title."""
    path = str(tmp_path / 'small.mhd')
    world, _ = make_scan(path, nodules=NODULES[:1])
    image = sitk.ReadImage(path)
    hu = sitk.GetArrayFromImage(image)
    z = (np.arange(hu.shape[0]) - (hu.shape[0] - 1) / 2) * image.GetSpacing()[2]
    hu[(np.abs(z) > 14)[:, None, None] & (hu < -500) & (hu > -950)] = 30  # lung beyond 14 mm: soft tissue
    small = sitk.GetImageFromArray(hu)
    small.CopyInformation(image)
    sitk.WriteImage(small, path)
    table = str(tmp_path / 'at.csv')
    write_csv(table, [{'coordX': world[0][0], 'coordY': world[0][1], 'coordZ': world[0][2], 'diameter_mm': 8}])
    with pytest.raises(UserError, match='empty lung mask'):
        predict.main(RUN=finished, SCAN=path, AT=table, DEVICE='cpu')
    titles = []

    def plot_cam(cube, cam, png, title, **kw):
        titles.append(title)
        open(png, 'wb').close()
    monkeypatch.setattr(predict.evaluation, 'plot_cam', plot_cam)
    out = score(finished, path, table, CAM=True)
    warning = out['predictions']['scan_warning'][0]
    assert re.fullmatch(r'lung mask found only with LUNG_ML=\(20.0, 8200.0\): air region\(s\) of \d+(\.\d)?, '
                        r'\d+(\.\d)? ml, outside the default 100..8200 ml of a lung; not a CT of the chest\? check '
                        r'the scan before trusting its probabilities', warning), warning
    assert f'WARNING: scan {path}: {warning}' in open(os.path.join(out['run'], 'log.txt')).read()
    assert pd.read_csv(os.path.join(out['run'], 'predictions.csv'))['scan_warning'][0] == warning
    assert titles[0].endswith('\nWARNING: ' + warning.replace('; ', ';\n'))
    make_scan(str(tmp_path / 'normal.mhd'), nodules=NODULES[:1])
    normal = score(finished, str(tmp_path / 'normal.mhd'), table)['predictions']
    assert normal['scan_warning'].fillna('').tolist() == ['']  # whole lungs: no warning


def test_a_table_in_ras_is_refused_or_scored_with_a_warning(finished, demo, tmp_path):  # noqa: F811
    folder, _ = demo
    rows = pd.read_csv(os.path.join(folder, 'nodules.csv')).to_dict('records')
    nii = os.path.join(folder, 'demo.nii.gz')
    image = sitk.ReadImage(nii)
    cx, cy, _ = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    ras = str(tmp_path / 'ras.csv')  # x and y mirrored about the scan's centre: each point lands in the other lung
    write_csv(ras, [dict(r, coordX=round(2 * cx - r['coordX'], 3), coordY=round(2 * cy - r['coordY'], 3))
                    for r in rows[:2]])
    x, y, z = round(2 * cx - rows[0]['coordX'], 3), round(2 * cy - rows[0]['coordY'], 3), rows[0]['coordZ']
    refused(finished, nii, ras, rf'^SCAN {nii}: 2 of 2 nodules of the table have nothing denser than lung at their '
            rf'centre: line 2, nodule_id n0: no nodule at \({x:g}, {y:g}, {z:g}\) mm, nothing denser than -760 HU '
            r'within 4 mm \(densest -\d+ HU\); line 3, .*: are the coordinates LPS world mm, as LUNA16\'s \(x growing '
            r'to the patient\'s left, y to the back\), and of this scan\? \(--CENTRE_CHECK=warn scores them anyway\)$',
            tmp_path)
    out = score(finished, nii, ras, CENTRE_CHECK='warn')
    assert len(out['predictions']) == 2
    log = open(os.path.join(out['run'], 'log.txt')).read()
    assert log.count(f'WARNING: scan {nii}, line ') == 2 and 'scored (CENTRE_CHECK=warn)' in log
