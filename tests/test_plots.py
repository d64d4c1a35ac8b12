"""plot_op_weights on synthetic weight CSVs: a readable PNG for 1 and many epochs, clear errors for bad files."""
import csv

import numpy as np
import pytest
from matplotlib.image import imread

from figures import diagrams
from figures.search import edge_label, plot_op_weights, read_op_weights, state_name
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


def assert_real_image(png, min_size=(200, 400)):
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > min_size[0] and img.shape[1] > min_size[1]
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
    assert_real_image(png)


def test_plot_single_cell_few_edges(tmp_path):
    csv_path = write_weights(tmp_path / 'w.csv', 4, cells=('reduce',), edges=3, ops=OPS[:2])
    assert_real_image(plot_op_weights(csv_path, tmp_path / 'w.png'))


def test_read_keeps_op_order_and_all_points(tmp_path):
    series, ops = read_op_weights(write_weights(tmp_path / 'w.csv', 3))
    assert ops == OPS
    assert len(series) == 28
    assert [e for e, _ in series[('reduce', 13)]['skip_connect']] == [0, 1, 2]


def test_edge_labels_name_states_as_the_cell_diagram_does():
    # Node n has inputs c_{k-2}, c_{k-1}, nodes 0 .. n-1; edges 0-1 feed node 0, 2-4 node 1, 5-8 node 2, 9-13 node 3.
    assert [edge_label(e) for e in (0, 1, 2, 4, 5, 8, 9, 13)] == [
        'c$_{k-2}$\u2192node 0', 'c$_{k-1}$\u2192node 0', 'c$_{k-2}$\u2192node 1', '0\u2192node 1',
        'c$_{k-2}$\u2192node 2', '1\u2192node 2', 'c$_{k-2}$\u2192node 3', '2\u2192node 3']
    assert [state_name(s) for s in (0, 1, 2, 5)] == [diagrams._name(s) for s in (0, 1, 2, 5)]  # as in cells.png


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


# ---------------------------------------------------------------- what a figure shows, read from the figure

import json  # noqa: E402 - the figure-reading tests below
import os  # noqa: E402

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import draw  # noqa: E402
from figures import evaluation, runs, search  # noqa: E402


@pytest.fixture
def drawn(monkeypatch):
    """The Figures saved while the test runs (savefig still writes them)."""
    figs = []
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        figs.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Figure, 'savefig', savefig)
    return figs


def texts(fig):
    """Every text of a figure, its tables' cells included."""
    cells = [c.get_text() for ax in fig.axes for table in ax.tables for c in table.get_celld().values()]
    return [t.get_text() for t in fig.findobj(Text) + cells if t.get_text()]


def one_fold_run(root):
    """A retrain run folder with one test fold (5) and one epoch, as train_3D_continuation writes it."""
    run = root / 'runs' / 'train_3D_continuation-20260101-000000-000000'
    run.mkdir(parents=True)
    (run / 'metrics_fold5.csv').write_text('epoch,lr,train_loss,train_acc,test_loss,test_acc\n0,0.1,0.7,50,0.69,55\n')
    (run / 'probs_fold5.csv').write_text('nodule_id,label,prob\n' + ''.join(
        f'n{i},{i % 2},{0.2 + 0.6 * (i % 2) + 0.01 * i}\n' for i in range(8)))
    (run / 'result_fold5.json').write_text(json.dumps(
        {'fold': 5, 'acc': 75.0, 'sens': 70.0, 'spec': 80.0, 'f1': 72.0, 'auc': 81.0, 'params_M': 0.1}))
    return str(run)


def test_one_fold_one_epoch_run_reads_in_singular_with_integer_ticks_and_no_machine_path(tmp_path, drawn):
    run = one_fold_run(tmp_path)
    runs.draw_run(run, log=lambda line: None)
    assert len(drawn) == 4  # retrain curves, ROC, confusion, k-fold table
    for fig in drawn:
        assert not any(str(tmp_path) in t or 'runs/' in t for t in texts(fig)), texts(fig)
        assert any('train_3D_continuation-20260101-000000-000000' in t for t in texts(fig))
    curves, roc, _, table = drawn
    for ax in curves.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    # one fold: its own curve, not hidden under a 'mean of 1 fold' drawn over it
    assert not [t for t in texts(roc) if t.startswith('mean')]
    fold = [ln for ln in roc.axes[0].get_lines() if ln.get_label().startswith('fold 5')]
    assert [ln.get_label() for ln in fold] == ['fold 5 (AUC 1.000, n=8)'] and fold[0].get_linewidth() >= 2
    assert any(t.startswith('ROC of test fold 5,') for t in texts(roc))
    assert not any('mean' in t for t in texts(table)) and '75.00' in texts(table)


def test_roc_mean_of_several_folds_keeps_the_plural_and_spread(tmp_path, drawn):
    run = one_fold_run(tmp_path)
    import shutil
    shutil.copy(os.path.join(run, 'probs_fold5.csv'), os.path.join(run, 'probs_fold6.csv'))
    evaluation.plot_roc(run, str(tmp_path / 'roc.png'))
    assert [t for t in texts(drawn[0]) if t.startswith('mean of')] == ['mean of 2 folds (AUC 1.000 ± 0.000)']


def test_leaders_and_their_leads_worked_example():
    # edge 0: b leads a by 0.02; edge 1: a and b tie (the first wins, lead 0); edge 2: 'none' is highest but never
    # leads nor runs up (derive_cell never keeps it): c leads a by 0.1
    ops = ['a', 'b', 'c', 'none']
    w = [[0.50, 0.52, 0.49, 0.1], [0.3, 0.3, 0.2, 0.1], [0.4, 0.2, 0.5, 0.9]]
    first, lead = search.leaders(w, ops)
    assert first.tolist() == [1, 0, 2] and lead == pytest.approx([0.02, 0.0, 0.1])
    # the final leader's lead per epoch: b trailed a by 0.02 at epoch 0, led by 0.02 at epoch 1
    history = search.lead_history([[[0.52, 0.50, 0.49, 0.9]], [[0.50, 0.52, 0.49, 0.9]]], [1], ops)
    assert history[:, 0] == pytest.approx([-0.02, 0.02])
    assert [search.lead_text(v) for v in (0.0, 0.00021, 0.31)] == ['tie', '+0.00021', '+0.31']
    assert [search.node_of(e) for e in (0, 1, 2, 4, 5, 13)] == [(0, 0), (0, 1), (1, 0), (1, 2), (2, 0), (3, 4)]


def test_weights_png_frames_each_edges_leader_and_plots_its_lead(tmp_path, drawn):
    # one node (edges 0, 1), 2 epochs: on edge 0 b overtakes a (lead -0.002, then +0.003); on edge 1 a leads by 0.4
    path = tmp_path / 'w.csv'
    path.write_text('epoch,cell,edge,op,weight\n0,reduce,0,a,0.502\n0,reduce,0,b,0.5\n1,reduce,0,a,0.499\n'
                    '1,reduce,0,b,0.502\n0,reduce,1,a,0.6\n0,reduce,1,b,0.4\n1,reduce,1,a,0.7\n1,reduce,1,b,0.3\n')
    plot_op_weights(path, tmp_path / 'w.png')
    fig = drawn[0]
    heat, lines = fig.axes[0], fig.axes[2]
    frames = sorted(p.get_xy() for p in heat.patches)
    assert frames == [(-0.5, 0.5), (0.5, -0.5)]  # edge 0 (row 0): b (column 1); edge 1 (row 1): a (column 0)
    assert [t.get_text() for t in heat.child_axes[0].get_yticklabels()] == ['b +0.003', 'a +0.4']  # on the right
    assert np.asarray(heat.images[0].get_array()) == pytest.approx(np.array([[-0.0015, 0.0015], [0.2, -0.2]]))
    leads = [ln for ln in lines.get_lines() if ln.get_label().startswith('c$')]
    assert [ln.get_label() for ln in leads] == ['c$_{k-2}$: b', 'c$_{k-1}$: a']
    assert list(leads[0].get_ydata()) == pytest.approx([-0.002, 0.003])
    assert list(leads[1].get_ydata()) == pytest.approx([0.2, 0.4])
    shown = texts(fig)
    assert any(t.startswith('reduction cell') for t in shown) and not any('reduce' in t for t in shown)


def test_weights_with_a_missing_row_is_one_line(tmp_path):
    path = tmp_path / 'w.csv'
    path.write_text('epoch,cell,edge,op,weight\n0,normal,0,a,0.5\n0,normal,0,b,0.5\n1,normal,0,a,0.5\n')
    with pytest.raises(UserError, match=r'w\.csv: no weight of b on normal cell edge 0 at epoch 1'):
        plot_op_weights(path, tmp_path / 'w.png')
    assert not (tmp_path / 'w.png').exists()


def test_pareto_size_axis_keeps_to_the_candidates():
    # candidates of 0.01-0.05 M beside the paper's 12.79 M: the axis spans the candidates only (with a 1.25x margin)
    assert search.size_range(np.array([1e4, 5e4]), 12.79e6) == pytest.approx((8e3, 6.25e4, False))
    # a paper size within 4x of them widens the axis to it
    assert search.size_range(np.array([1e6, 5e6]), 12.79e6) == pytest.approx((8e5, 12.79e6 * 1.25, True))
    assert search.size_range(np.array([1e6]), None)[2] is False


def test_pareto_says_where_the_paper_genotype_lies(tmp_path, drawn):
    csv_path = tmp_path / 'evaluations.csv'
    csv_path.write_text('params,f1,generation\n10000,0.5,0\n50000,0.3,0\n')
    search.plot_pareto(csv_path, tmp_path / 'p.png', run='train_evolve-x')
    ax = drawn[0].axes[0]
    assert ax.get_xlim() == pytest.approx((0.008, 0.0625))  # millions
    assert ax.get_title() == ('train_evolve-x: 2 candidates, front of 2\npaper genotype, C=36, 20 cells: 12.79 M '
                              'parameters, 256x the largest candidate (right of this axis)')
    assert not [ln for ln in ax.get_lines() if 'paper' in ln.get_label()]
    csv_path.write_text('params,f1,generation\n')
    with pytest.raises(UserError, match='evaluations.csv: no candidate rows yet'):
        search.plot_pareto(csv_path, tmp_path / 'q.png')


def test_pareto_generations_are_whole_numbers(tmp_path, drawn):
    norm, ticks = search.generation_colours(np.array([0, 0, 1, 2, 2]))
    assert ticks == [0, 1, 2] and list(norm.boundaries) == [-0.5, 0.5, 1.5, 2.5]
    assert search.generation_colours(np.arange(30))[1] == list(range(0, 30, 3))  # at most 10 ticks
    csv_path = tmp_path / 'evaluations.csv'
    csv_path.write_text('params,f1,generation\n' + ''.join(f'{1e5 * (1 + i)},{0.5 - 0.02 * i},{i // 2}\n'
                                                            for i in range(6)))
    search.plot_pareto(csv_path, tmp_path / 'p.png')
    bar = drawn[0].axes[1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ['0', '1', '2']


def test_cell_nodes_are_laid_out_in_index_order():
    # node 3 reads only the cell inputs (depth 1) while nodes 0-2 form a chain (depths 1-3): by depth alone node 3
    # was drawn left of node 2.
    edges = [('skip_connect', 0), ('skip_connect', 1), ('skip_connect', 2), ('skip_connect', 0),
             ('skip_connect', 3), ('skip_connect', 1), ('skip_connect', 0), ('skip_connect', 1)]
    pos = diagrams.cell_layout(edges, [2, 3, 4, 5])
    xs = [pos[s][0] for s in (2, 3, 4, 5)]
    assert xs == sorted(xs) and pos['out'][0] > xs[-1]


def test_draw_genotype_without_out_writes_into_runs_and_says_where(tmp_path, monkeypatch, capsys, drawn):
    monkeypatch.chdir(tmp_path)
    assert draw.main(GENOTYPE='NAS_HBO_PAPER') == [os.path.join('runs', 'cells_NAS_HBO_PAPER.png')]
    assert os.path.isfile(tmp_path / 'runs' / 'cells_NAS_HBO_PAPER.png')
    assert capsys.readouterr().out == f'written {os.path.join("runs", "cells_NAS_HBO_PAPER.png")}\n'
    assert runs.genotype_title(str(tmp_path / 'runs' / 'x-1' / 'genotype.json')) == 'x-1/genotype.json'


def test_cam_overlay_keeps_the_ct_visible_and_outlines_the_nodule(tmp_path, drawn):
    cube = np.full((16, 16, 16), 100, np.uint8)
    zz, yy, xx = np.mgrid[:16, :16, :16] - 8
    cam = np.exp(-(zz ** 2 + yy ** 2 + xx ** 2) / 10.0)
    evaluation.plot_cam(cube, cam, str(tmp_path / 'c.png'), 'nodule', diameter_mm=6.0)
    fig = drawn[0]
    overlays = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name != 'gray']
    assert len(overlays) == 3 and all(im.get_cmap().name == 'magma' and im.get_alpha() <= 0.35 for im in overlays)
    circles = [p for ax in fig.axes for p in ax.patches if isinstance(p, Circle)]
    assert len(circles) == 6 and all(c.get_radius() == 3.0 and c.center == (8, 8) for c in circles)
    assert all(ax.collections for ax in fig.axes[3:6])  # the map's contours over the CT


def test_cam_without_a_usable_diameter_draws_no_outline(tmp_path, drawn):
    # an empty diameter_mm cell of a cube set's table reads as NaN: no NaN circle, no '(nan mm)' in the title
    cube, cam = np.full((8, 8, 8), 100, np.uint8), np.random.default_rng(0).random((8, 8, 8))
    for i, diameter in enumerate((float('nan'), 0.0, None)):
        evaluation.plot_cam(cube, cam, str(tmp_path / f'c{i}.png'), 'nodule', diameter_mm=diameter)
        fig = drawn[-1]
        assert not [p for ax in fig.axes for p in ax.patches if isinstance(p, Circle)]
        assert 'nan' not in fig._suptitle.get_text() and 'dashed circle' not in fig._suptitle.get_text()


def test_cam_ct_planes_have_a_grey_scale_in_hounsfield_units(tmp_path, drawn):
    from scans.lungmask import HU_WINDOW, window
    positions, hus = evaluation.hu_ticks((-1200.0, 600.0))
    assert hus.tolist() == [-1200, -800, -400, 0, 400]
    assert positions == pytest.approx([0, 56.667, 113.333, 170, 226.667], abs=1e-3)
    # the cubes' own windowing puts each HU value where its tick is
    assert window(hus).tolist() == np.rint(evaluation.hu_ticks(HU_WINDOW)[0]).astype(int).tolist()
    cube, cam = np.full((8, 8, 8), 100, np.uint8), np.random.default_rng(0).random((8, 8, 8))
    evaluation.plot_cam(cube, cam, str(tmp_path / 'c.png'), 'nodule')
    bars = [ax for ax in drawn[0].axes if ax.get_label() == '<colorbar>']
    grey = next(ax for ax in bars if ax.get_ylabel().startswith('CT (HU'))
    assert [t.get_text() for t in grey.get_yticklabels()] == ['-1200', '-800', '-400', '0', '400']
    assert grey.get_yticks() == pytest.approx(evaluation.hu_ticks(HU_WINDOW)[0])
