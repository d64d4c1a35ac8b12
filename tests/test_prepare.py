"""prepare.py on a tiny synthetic LUNA16 tree: nodule positions, failure isolation, resume, labels."""
import csv
import json
import os
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk

import prepare
from scans import luna, pool
from utils import UserError

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SMALL_LUNGS = (20.0, 8200.0)  # the phantom's lungs are ~100 ml each, smaller than an adult's


def make_scan(path, spacing=(1.4, 1.4, 2.5), size=(100, 100, 40), origin=(-70.0, -70.0, -320.0),
              flip=False, lungs=True, nodules=((34.0, 3.0, 8.0),), seed=0):
    """Write a phantom .mhd/.raw: air, an elliptic body (30 HU), a spine (700 HU), two lungs (-850 HU) and
    bright spheres (400 HU, radius 4 mm) at `nodules`, given as mm offsets (x, y, z) from the volume
    centre along the index axes. Returns the world (x, y, z) of each nodule as ITK computes it, and its
    raw (x, y, z) index."""
    size, spacing = np.asarray(size), np.asarray(spacing, dtype=float)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size[::-1], spacing[::-1])],
                          indexing='ij')  # (z, y, x) grids of mm offsets
    hu = np.full(z.shape, -1000.0)
    hu[(x / 62) ** 2 + (y / 48) ** 2 <= 1] = 30.0
    hu[(x / 9) ** 2 + ((y - 36) / 9) ** 2 <= 1] = 700.0
    if lungs:
        for cx in (-28.0, 28.0):
            hu[((x - cx) / 21) ** 2 + ((y + 3) / 31) ** 2 + (z / 44) ** 2 <= 1] = -850.0
    for ox, oy, oz in nodules:
        hu[(x - ox) ** 2 + (y - oy) ** 2 + (z - oz) ** 2 <= 16.0] = 400.0
    hu += np.random.default_rng(seed).normal(0, 15, hu.shape)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin)
    if flip:
        image.SetDirection(FLIPPED)
    sitk.WriteImage(image, path)
    index = [np.asarray(o) / spacing + (size - 1) / 2 for o in nodules]  # continuous (x, y, z) raw index
    return [image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index], index


def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """LUNA16 tree: 3 good scans (one flipped) in subsets 0 and 3, and 3 bad ones; annotations and a
    cluster table. Returns (root, world centres by scan, cluster rows)."""
    root = str(tmp_path_factory.mktemp('luna16'))
    for k in (0, 3):
        os.makedirs(os.path.join(root, f'subset{k}'))
    specs = {'scanA': dict(folder=0, nodules=((34.0, 3.0, 8.0), (-30.0, -10.0, -12.0))),
             'scanB': dict(folder=0, flip=True, spacing=(1.2, 1.2, 2.0), origin=(60.0, 80.0, -100.0),
                           nodules=((20.0, 12.0, 15.0),)),
             'scanC': dict(folder=3, spacing=(1.6, 1.6, 1.8), size=(88, 88, 50), nodules=((-25.0, 5.0, 0.0),)),
             'nolungs': dict(folder=3, lungs=False, nodules=())}
    world, index = {}, {}
    for uid, spec in specs.items():
        folder = spec.pop('folder')
        world[uid], index[uid] = make_scan(os.path.join(root, f'subset{folder}', f'{uid}.mhd'), **spec)
    # a truncated .raw, a .raw longer than its header says, a missing .raw, and a header with a zero spacing
    for uid in ('truncated', 'toolong', 'noraw'):
        make_scan(os.path.join(root, 'subset3', f'{uid}.mhd'), lungs=False, nodules=())
    raw = os.path.join(root, 'subset3', 'truncated.raw')
    os.truncate(raw, os.path.getsize(raw) // 2)
    with open(os.path.join(root, 'subset3', 'toolong.raw'), 'ab') as f:
        f.write(bytes(2 * 100 * 100))  # one more 100 x 100 slice of MET_SHORT
    os.remove(os.path.join(root, 'subset3', 'noraw.raw'))
    with open(os.path.join(root, 'subset0', 'badheader.mhd'), 'w') as f:
        f.write('ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementSpacing = 0 1 1\n'
                'ElementType = MET_SHORT\nElementDataFile = badheader.raw\n')
    with open(os.path.join(root, 'subset0', 'badheader.raw'), 'wb') as f:
        f.write(bytes(2 * 8 ** 3))
    # annotations (world centres off by up to 1 mm) plus one nodule no reader marked
    ann = [{'seriesuid': u, 'coordX': w[0] + 0.6, 'coordY': w[1] - 0.5, 'coordZ': w[2] + 0.8, 'diameter_mm': 8.0}
           for u in ('scanA', 'scanB', 'scanC') for w in world[u]]
    ann.append({'seriesuid': 'scanC', 'coordX': 0.0, 'coordY': 0.0, 'coordZ': -200.0, 'diameter_mm': 5.0})
    write_csv(os.path.join(root, 'annotations.csv'), ann)
    # reader clusters: (row, col) pixel indices of the raw scan and world z, as lidc.nodule_table gives them
    clusters = []
    labels = {'scanA': [0, 1], 'scanB': [1], 'scanC': [-1]}
    for uid, labs in labels.items():
        for w, i, lab in zip(world[uid], index[uid], labs):
            clusters.append({'nodule_id': f'{uid}_{lab}', 'seriesuid': uid, 'label': lab, 'diameter_mm': 7.5,
                             'row': i[1], 'col': i[0], 'z': w[2], 'malignancy': 2.0 + 2 * lab})
    clusters.append({'nodule_id': 'far', 'seriesuid': 'scanA', 'label': 1, 'diameter_mm': 9.0, 'row': 0.0,
                     'col': 0.0, 'z': -320.0, 'malignancy': 4.5})
    write_csv(os.path.join(root, 'clusters.csv'), clusters)
    return root, world, clusters


@pytest.fixture(scope='module')
def prepared(tree, tmp_path_factory):
    root, _, _ = tree
    out = str(tmp_path_factory.mktemp('prepared'))
    runs = str(tmp_path_factory.mktemp('runs'))
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, NODULE_TABLE=os.path.join(root, 'clusters.csv'),
                           WORKERS=2, LUNG_ML=SMALL_LUNGS, RUNS=runs)
    return out, runs, summary


def test_good_scans_processed_bad_ones_listed(prepared, tree):
    out, _, summary = prepared
    assert sorted(summary['processed']) == ['scanA', 'scanB', 'scanC']
    assert summary['skipped'] == []
    reasons = {f['seriesuid']: f['reason'] for f in summary['failed']}
    assert sorted(reasons) == ['badheader', 'nolungs', 'noraw', 'toolong', 'truncated']
    assert 'empty lung mask' in reasons['nolungs']
    raw = os.path.join(tree[0], 'subset3', '{}.raw')
    n = 100 * 100 * 40 * 2  # DimSize 100 100 40, MET_SHORT
    assert reasons['truncated'] == (f'truncated data file {raw.format("truncated")}: {n // 2} bytes, the header '
                                    f'needs {n} (DimSize 100 x 100 x 40 x 2 bytes (MET_SHORT))')
    assert reasons['toolong'].startswith(f'data file {raw.format("toolong")} has {n + 20000} bytes, more than '
                                         f'the {n} its header describes')
    mhd = raw.format('noraw')[:-4] + '.mhd'
    assert reasons['noraw'] == f'missing data file {raw.format("noraw")} (ElementDataFile of {mhd})'
    assert reasons['badheader'].startswith('bad header') and 'spacing' in reasons['badheader']
    listed = {r['seriesuid']: r['reason'] for r in read_csv(os.path.join(out, 'failures.csv'))}
    assert listed == reasons
    assert not os.path.exists(os.path.join(out, 'volumes', 'nolungs.npy'))


def test_nodules_land_at_world_to_voxel(prepared, tree):
    """The bright spheres' centroid in each saved volume is where world_to_voxel puts the world centre."""
    out, _, _ = prepared
    _, world, _ = tree
    for uid, centres in world.items():
        if uid == 'nolungs':
            continue
        volume = np.load(os.path.join(out, 'volumes', f'{uid}.npy'))
        with open(os.path.join(out, 'volumes', f'{uid}.json')) as f:
            geometry = json.load(f)
        assert volume.dtype == np.uint8 and list(volume.shape) == geometry['shape']
        assert not geometry['flip'] and geometry['direction'] == np.eye(3).tolist()  # axes turned to +x +y +z
        assert (np.ravel(geometry['file_direction']).tolist() == list(FLIPPED)) == (uid == 'scanB')
        for w in centres:
            expected = prepare.world_to_voxel(w, geometry)
            lo = np.maximum(np.round(expected).astype(int) - 8, 0)
            patch = volume[lo[0]:lo[0] + 17, lo[1]:lo[1] + 17, lo[2]:lo[2] + 17]
            bright = np.argwhere(patch > 215)  # the spheres: 400 HU -> 227; bone in the mask ring -> 170
            assert len(bright) > 20, uid
            assert np.abs(bright.mean(0) + lo - expected).max() < 1.0, uid
        # the spine (700 HU) is bone: only the spheres stay brighter than 215 anywhere
        assert (volume > 215).sum() < 300 * len(centres)
        assert (volume == 170).mean() > 0.05  # outside the dilated lungs


def test_world_to_voxel_worked_example():
    """Hand-computed: flipped scan, raw shape (10, 20, 30), spacing z 2, y 0.5, x 0.5, box start (1, 2, 3)."""
    g = {'origin': [-100.0, 50.0, 40.0], 'spacing': [2.0, 0.5, 0.5], 'flip': True, 'raw_shape': [10, 20, 30],
         'resolution': 1.0, 'box_start': [1, 2, 3]}
    # world (x 38, y 45, z -96): raw index z 2, y 10, x 4; mirrored y 19 - 10 = 9, x 29 - 4 = 25;
    # in mm: z 4, y 4.5, x 12.5; minus the box start
    assert np.allclose(luna.world_to_voxel((38.0, 45.0, -96.0), g), [3.0, 2.5, 9.5])
    g['flip'] = False  # the same voxel, now on the +x +y side of the origin
    assert np.allclose(luna.world_to_voxel([[42.0, 55.0, -96.0]] * 2, g), [[3.0, 3.0, -1.0]] * 2)
    # a point before the origin lies outside the scan: negative index, never mirrored back inside
    assert np.allclose(luna.world_to_voxel((38.0, 45.0, -96.0), g), [3.0, -7.0, -5.0])
    g['direction'] = [[1, 0, 0], [0, 1, 0], [0, 0, -1]]  # z index growing to the feet: z mm = -100 - 2 * index
    assert np.allclose(luna.world_to_voxel((42.0, 55.0, -104.0), g), [3.0, 3.0, -1.0])  # z index 2, as -96 above


def test_labels_matched_by_scan_and_world_centre(prepared, tree):
    out, _, summary = prepared
    rows = read_csv(os.path.join(out, 'labels.csv'))
    assert len(rows) == 5
    got = {(r['seriesuid'], round(float(r['coordZ']), 1)): (int(r['label']), int(r['fold'])) for r in rows}
    _, world, _ = tree
    z = {u: [round(w[2] + 0.8, 1) for w in world[u]] for u in world}
    assert got[('scanA', z['scanA'][0])] == (0, 0)
    assert got[('scanA', z['scanA'][1])] == (1, 0)
    assert got[('scanB', z['scanB'][0])] == (1, 0)  # flipped: (row, col) -> world uses the direction
    assert got[('scanC', z['scanC'][0])] == (-1, 3)
    assert got[('scanC', -200.0)] == (-1, 3)  # no reader cluster
    counts = summary['labels']
    assert (counts['matched'], counts['benign'], counts['malignant'], counts['excluded'], counts['unmatched']) \
        == (4, 1, 2, 1, 1)
    assert counts['clusters'] == 5
    assert all(float(r['match_mm']) < 1.5 for r in rows if r['match_mm'] not in ('', 'nan'))
    # the spheres lie inside the lungs (filled holes): masking changed nothing there, protected or not
    masked = {(r['seriesuid'], round(float(r['coordZ']), 1)): (r['masked_frac'], r['masked_frac_unprotected'])
              for r in rows}
    assert masked.pop(('scanC', -200.0)) == ('nan', 'nan')  # outside its scan (z -320 .. -231.8)
    assert list(masked.values()) == [('0.0', '0.0')] * 4
    assert (counts['masked_known'], counts['masked_over'], counts['masked_over_unprotected']) == (4, 0, 0)


def test_second_run_skips_done_scans(prepared, tree):
    out, runs, first = prepared
    root = tree[0]
    stamp = os.path.getmtime(os.path.join(out, 'volumes', 'scanA.npy'))
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, NODULE_TABLE=os.path.join(root, 'clusters.csv'),
                           WORKERS=2, LUNG_ML=SMALL_LUNGS, RUNS=runs, LABELS=False)
    assert sorted(summary['skipped']) == ['scanA', 'scanB', 'scanC']
    assert summary['processed'] == []
    assert sorted(f['seriesuid'] for f in summary['failed']) == ['badheader', 'nolungs', 'noraw', 'toolong',
                                                                 'truncated']
    assert os.path.getmtime(os.path.join(out, 'volumes', 'scanA.npy')) == stamp  # not processed again


def test_nothing_processed_is_an_error(tmp_path):
    os.makedirs(tmp_path / 'luna' / 'subset0')
    make_scan(str(tmp_path / 'luna' / 'subset0' / 'empty.mhd'), lungs=False, nodules=())
    with pytest.raises(UserError, match='no scan could be processed'):
        prepare.main(LUNA16_DIR=str(tmp_path / 'luna'), OUT_DIR=str(tmp_path / 'out'), WORKERS=1, LABELS=False,
                     RUNS=str(tmp_path / 'runs'), START_METHOD='fork')
    assert 'empty lung mask' in read_csv(str(tmp_path / 'out' / 'failures.csv'))[0]['reason']


def test_non_finite_voxels_fail_the_scan_with_their_count(tmp_path):
    """A float scan whose lungs are NaN was reported as 'empty lung mask'; a few NaN voxels in a nodule were
    preprocessed silently."""
    os.makedirs(tmp_path / 'luna' / 'subset0')
    path = str(tmp_path / 'luna' / 'subset0' / 'nan.mhd')
    make_scan(path, nodules=())
    image = sitk.ReadImage(path)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    hu[hu < -500] = np.nan  # air and lungs
    nan = sitk.GetImageFromArray(hu)
    nan.CopyInformation(image)
    sitk.WriteImage(nan, path)
    with pytest.raises(UserError, match='no scan could be processed'):
        prepare.main(LUNA16_DIR=str(tmp_path / 'luna'), OUT_DIR=str(tmp_path / 'out'), WORKERS=1, LABELS=False,
                     RUNS=str(tmp_path / 'runs'), START_METHOD='fork')
    reason = read_csv(str(tmp_path / 'out' / 'failures.csv'))[0]['reason']
    assert reason.startswith(f'{path}: {int(np.isnan(hu).sum())} of {hu.size} voxels are not finite numbers '
                             f'({int(np.isnan(hu).sum())} NaN, 0 infinite; the first at voxel (z, y, x) [0, 0, 0]): '
                             'replace them (e.g. with -1000 HU, air) and rerun')


def test_missing_folder_and_unknown_setting(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        prepare.main(LUNA16_DIR=str(tmp_path / 'nowhere'), RUNS=str(tmp_path / 'runs'))
    with pytest.raises(UserError, match='unknown setting'):
        prepare.main(WORKRS=2)


def toy_job(job):
    """A job for the pool test: 'crash' kills its worker, ('hang', marker) writes the marker and never ends,
    'raise' raises."""
    if job == 'crash':
        os._exit(3)
    if isinstance(job, tuple):
        open(job[1], 'w').close()
        time.sleep(600)
    if job == 'raise':
        raise ValueError('bad input')
    return job * 10


def test_pool_isolates_crash_hang_and_error(tmp_path, monkeypatch):
    # the pool's clock stands still: no job can time out however slowly the machine runs it
    monkeypatch.setattr(pool, 'time', types.SimpleNamespace(monotonic=lambda: 0.0))
    jobs = [1, 2, 'crash', 3, 'raise', 4, 5, 6]
    results = {j: (ok, r) for j, ok, r in pool.run_isolated(toy_job, jobs, workers=3, timeout_s=2.0,
                                                                 start_method='fork')}
    assert sorted(results, key=str) == sorted(jobs, key=str)  # every job reported exactly once
    for j in (1, 2, 3, 4, 5, 6):
        assert results[j] == (True, j * 10)
    assert results['crash'] == (False, pool.DIED)
    assert results['raise'] == (False, 'ValueError: bad input')
    # one worker: the clock moves 1 s per look only while the hanging job (started: its marker) is unreported, so
    # it alone passes the 2 s and the job after it, in the restarted pool, runs as usual
    hang, clock = ('hang', str(tmp_path / 'hanging')), {'now': 0.0, 'hang reported': False}

    def monotonic():
        if os.path.exists(hang[1]) and not clock['hang reported']:
            clock['now'] += 1.0
        return clock['now']
    monkeypatch.setattr(pool, 'time', types.SimpleNamespace(monotonic=monotonic))
    seen = []
    for j, ok, r in pool.run_isolated(toy_job, [7, hang, 8], workers=1, timeout_s=2.0, start_method='fork'):
        seen.append((j, ok, r))
        clock['hang reported'] |= j == hang
    assert seen == [(7, True, 70), (hang, False, 'timed out after 2 s'), (8, True, 80)]


def test_header_checked_against_data_file(tmp_path):
    """Expected bytes = DimSize x channels x element bytes (+ HeaderSize), also for data inside the header
    file (LOCAL) and for vector images; compressed data pass to ITK; a bad field is named."""
    def write(name, array, **kw):
        path = str(tmp_path / name)
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 4), path, **kw)
        return path
    plain = write('plain.mhd', np.zeros((3, 4, 5), np.float32))
    assert luna.check_data_file(plain) == str(tmp_path / 'plain.raw')
    vector = write('vector.mhd', np.zeros((3, 4, 5, 2), np.int16))  # 2 channels
    assert luna.check_data_file(vector) == str(tmp_path / 'vector.raw')
    os.truncate(str(tmp_path / 'vector.raw'), 3 * 4 * 5 * 2 * 2 - 1)
    with pytest.raises(luna.ScanError, match='truncated .* 239 bytes, the header needs 240 .*2 channels'):
        luna.check_data_file(vector)
    local = write('local.mha', np.zeros((3, 4, 5), np.uint8))
    os.rename(local, str(tmp_path / 'local.mhd'))  # ElementDataFile = LOCAL: data after the header
    assert luna.check_data_file(str(tmp_path / 'local.mhd')) == str(tmp_path / 'local.mhd')
    with open(str(tmp_path / 'local.mhd'), 'ab') as f:
        f.write(b'\0')
    with pytest.raises(luna.ScanError, match='has 61 bytes, more than the 60'):
        luna.check_data_file(str(tmp_path / 'local.mhd'))
    packed = write('packed.mhd', np.zeros((3, 4, 5), np.int16), useCompression=True)
    assert luna.check_data_file(packed) == str(tmp_path / 'packed.zraw')
    with open(str(tmp_path / 'skip.mhd'), 'w') as f:
        f.write('NDims = 3\nDimSize = 2 2 2\nHeaderSize = 10\nElementType = MET_LONG\nElementDataFile = skip.raw\n')
    with open(str(tmp_path / 'skip.raw'), 'wb') as f:
        f.write(bytes(10 + 8 * 4))
    assert luna.check_data_file(str(tmp_path / 'skip.mhd')) == str(tmp_path / 'skip.raw')
    with open(str(tmp_path / 'odd.mhd'), 'w') as f:
        f.write('NDims = 3\nDimSize = 2 2\nElementType = MET_SHORT\nElementDataFile = skip.raw\n')
    with pytest.raises(luna.ScanError, match='bad header: DimSize = 2 2 in .*odd.mhd .expected 3 values'):
        luna.check_data_file(str(tmp_path / 'odd.mhd'))


def test_volume_without_protection_is_redone(prepared, tree):
    """A volume whose geometry does not protect the scan's annotations (made before the protection, or with
    another PROTECT_MM) is made again; the others are kept."""
    out, runs, _ = prepared
    root = tree[0]
    meta = os.path.join(out, 'volumes', 'scanA.json')
    with open(meta) as f:
        geometry = json.load(f)
    old = {k: v for k, v in geometry.items() if k not in ('nodules', 'protect_mm')}
    with open(meta, 'w') as f:
        json.dump(old, f)
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, WORKERS=1, LUNG_ML=SMALL_LUNGS, RUNS=runs, LABELS=False,
                           START_METHOD='fork')
    assert summary['processed'] == ['scanA'] and sorted(summary['skipped']) == ['scanB', 'scanC']
    with open(meta) as f:
        assert json.load(f) == geometry
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, WORKERS=1, LUNG_ML=SMALL_LUNGS, RUNS=runs, LABELS=False,
                           START_METHOD='fork', PROTECT_MM=5.0)
    assert sorted(summary['processed']) == ['scanA', 'scanB', 'scanC']
