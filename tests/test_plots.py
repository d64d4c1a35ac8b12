"""plot_op_weights on synthetic weight CSVs: a readable PNG for 1 and many epochs, clear errors for bad files."""
import csv

import numpy as np
import pytest
from matplotlib.image import imread

from figures.search import edge_label, plot_op_weights, read_op_weights
from utils import UserError

OPS = ['max_pool_3x3x3', 'avg_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3', 'dil_conv_5x5x5']


def write_weights(path, epochs, cells=('normal', 'reduce'), edges=14, ops=OPS, columns=None):
    """Weights drifting apart from 1/len(ops) as the epochs go by, one row per epoch x cell x edge x op."""
    rng = np.random.default_rng(0)
    drift = rng.normal(size=(len(cells), edges, len(ops)))
    columns = columns or ['epoch', 'cell', 'edge', 'op', 'weight']
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for epoch in range(epochs):
            for c, cell in enumerate(cells):
                for edge in range(edges):
                    for o, op in enumerate(ops):
                        w = float(np.clip(1 / len(ops) + 0.03 * epoch * drift[c, edge, o], 0, 1))
                        row = {'epoch': epoch, 'cell': cell, 'edge': edge, 'op': op, 'weight': w}
                        writer.writerow([row.get(col, '') for col in columns])
    return path


def assert_real_image(png):
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    rgb = img[..., :3].reshape(-1, 3)
    # Far from blank: many distinct colours (op lines, text) and a fair share of non-white pixels.
    codes = np.round(rgb * 255).astype(np.int64) @ np.array([65536, 256, 1])  # one integer per colour: fast unique
    assert len(np.unique(codes)) > 20
    assert (rgb.min(axis=1) < 0.9).mean() > 0.01
    return img


@pytest.mark.parametrize('epochs,cells', [(1, ('normal',)), (30, ('normal', 'reduce'))])
def test_plot_many_and_one_epoch(tmp_path, epochs, cells):
    csv_path = write_weights(tmp_path / 'weights.csv', epochs, cells=cells)
    png = tmp_path / 'out' / 'weights.png'
    assert plot_op_weights(csv_path, png, title=f'{epochs} epochs') == png
    img = assert_real_image(png)
    assert img.shape[0] < img.shape[1]  # 2 or 4 rows x 7 columns of panels: wider than tall


def test_plot_single_cell_few_edges(tmp_path):
    csv_path = write_weights(tmp_path / 'w.csv', 4, cells=('reduce',), edges=3, ops=OPS[:2])
    assert_real_image(plot_op_weights(csv_path, tmp_path / 'w.png'))


def test_read_keeps_op_order_and_all_points(tmp_path):
    series, ops = read_op_weights(write_weights(tmp_path / 'w.csv', 3))
    assert ops == OPS
    assert len(series) == 28
    assert [e for e, _ in series[('reduce', 13)]['skip_connect']] == [0, 1, 2]


def test_edge_labels_follow_darts_state_indices():
    # Node n (state n + 2) has inputs 0 .. n + 1; edges 0-1 feed node 0, 2-4 node 1, 5-8 node 2, 9-13 node 3.
    assert [edge_label(e)[-3:] for e in (0, 1, 2, 4, 5, 8, 9, 13)] == [
        '0\u21922', '1\u21922', '0\u21923', '2\u21923', '0\u21924', '3\u21924', '0\u21925', '4\u21925']


def test_missing_column_is_user_error(tmp_path):
    bad = write_weights(tmp_path / 'bad.csv', 2, columns=['epoch', 'cell', 'edge', 'op'])
    with pytest.raises(UserError, match=r'bad\.csv.*missing column.*weight'):
        plot_op_weights(bad, tmp_path / 'bad.png')
    assert not (tmp_path / 'bad.png').exists()


@pytest.mark.parametrize('line,message', [
    ('x,normal,0,skip_connect,0.5', 'epoch and edge must be integers'),
    ('0,normal,0,skip_connect,heavy', 'weight a number'),
    ('0,middle,0,skip_connect,0.5', 'cell must be one of'),
    ('0,normal,0,skip_connect,0.5\n0,normal,0,skip_connect,0.4', 'second row'),
])
def test_bad_values_are_user_errors(tmp_path, line, message):
    path = tmp_path / 'w.csv'
    path.write_text('epoch,cell,edge,op,weight\n' + line + '\n')
    with pytest.raises(UserError, match=rf'w\.csv, line \d: .*{message}'):
        plot_op_weights(path, tmp_path / 'w.png')


def test_empty_and_unreadable_files(tmp_path):
    path = tmp_path / 'empty.csv'
    path.write_text('epoch,cell,edge,op,weight\n')
    with pytest.raises(UserError, match='empty.csv: no data rows'):
        plot_op_weights(path, tmp_path / 'e.png')
    with pytest.raises(UserError, match='nope.csv: cannot read'):
        plot_op_weights(tmp_path / 'nope.csv', tmp_path / 'e.png')
