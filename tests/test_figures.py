"""Figures of runs: cell diagrams of genotypes, the figures a tiny search and a tiny retrain write as they finish,
redrawing them from the folder, the genotype's evolution and the search-train AUC."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_cube_set
from matplotlib.figure import Figure
from PIL import Image
from test_plots import assert_real_image

import data
import draw
import engine
import genotypes
import train_3D_continuation as retrain
import train_search
from figures import diagrams, evaluation, runs
from utils import UserError, binary_metrics

PRIMS = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')
SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
              PRIMITIVES=PRIMS, EPOCHS=3, WARMUP_EPOCHS=1, HYPERGRAD='first', SEED=1)
RETRAIN = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, TEST_FOLDS=(8, 9), EPOCHS=2, SEED=0)
SEARCH_PNGS = ('weights.png', 'genotype_evolution.png', 'search_curves.png', 'cells.png')
RETRAIN_PNGS = ('retrain_curves.png', 'roc.png', 'confusion.png', 'kfold_table.png', 'cells.png')


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=2)


@pytest.fixture(scope='module')
def search_run(cubes, tmp_path_factory):
    return train_search.main(DATA=cubes, RUNS=str(tmp_path_factory.mktemp('runs')), **SEARCH)


@pytest.fixture(scope='module')
def retrain_run(cubes, search_run, tmp_path_factory):
    return retrain.main(DATA=cubes, RUNS=str(tmp_path_factory.mktemp('runs')),
                        GENOTYPE=os.path.join(search_run['run'], 'genotype.json'), **RETRAIN)


def test_cell_diagram_of_the_paper_genotype(tmp_path):
    png = diagrams.plot_genotype('NAS_HBO_PAPER', tmp_path / 'cells.png')
    img = assert_real_image(png)
    assert img.shape[1] > img.shape[0]
    # a genotype.json draws the same cells
    genotypes.save_genotype(genotypes.NAS_HBO_PAPER, tmp_path / 'g.json')
    assert_real_image(diagrams.plot_genotype(str(tmp_path / 'g.json'), tmp_path / 'g.png'))
    with pytest.raises(UserError, match="unknown genotype 'NOPE'"):
        diagrams.plot_genotype('NOPE', tmp_path / 'n.png')


@pytest.mark.parametrize('cell', ['normal', 'reduce'])
def test_cell_diagram_has_every_edge_and_op_label(cell):
    edges = getattr(genotypes.NAS_HBO_PAPER, cell)
    concat = getattr(genotypes.NAS_HBO_PAPER, f'{cell}_concat')
    ax = Figure().add_subplot()
    diagrams.draw_cell(ax, edges, concat, cell, diagrams.op_colours([op for op, _ in edges]))
    texts = [t.get_text() for t in ax.texts]
    assert sorted(texts[:7]) == sorted(['c$_{k-2}$', 'c$_{k-1}$', '0', '1', '2', '3', 'c$_{k}$'])
    assert sorted(t.replace('\n', '_') for t in texts[7:]) == sorted(op for op, _ in edges)
    assert len(ax.patches) == 7 + len(edges) + len(concat)   # boxes, op edges, edges into c_k
    pos = diagrams.cell_layout(edges, concat)
    for e, (_, j) in enumerate(edges):                       # data flows left to right
        assert pos[j][0] < pos[e // 2 + 2][0] < pos['out'][0]


def test_search_run_writes_its_figures_and_auc(search_run):
    run = search_run['run']
    for name in SEARCH_PNGS:
        assert_real_image(os.path.join(run, name))
    metrics = pd.read_csv(os.path.join(run, 'metrics.csv'))
    assert metrics['train_auc'].between(0, 100).all()
    # the genotype recomputed from weights.csv for the last epoch is the one the search wrote
    history, ops = runs.genotype_history(os.path.join(run, 'weights.csv'))
    assert ops == list(PRIMS) and sorted(history['normal']) == [0, 1, 2]
    final = genotypes.load_genotype(os.path.join(run, 'genotype.json'))
    assert history['normal'][2] == final.normal and history['reduce'][2] == final.reduce


def test_redraw_from_the_run_folder(search_run, tmp_path):
    # (a retrain folder is drawn by the same draw_run at the end of its run: test_retrain_saves_...)
    run = search_run['run']
    for name in SEARCH_PNGS:
        os.remove(os.path.join(run, name))
    written = draw.main(RUN=run)
    assert sorted(os.path.basename(p) for p in written) == sorted(SEARCH_PNGS)
    for name in SEARCH_PNGS:
        assert_real_image(os.path.join(run, name))
    png = str(tmp_path / 'c.png')
    assert draw.main(GENOTYPE='NAS_HBO_PAPER', OUT=png, PALETTE=True) == [png]
    with Image.open(png) as img:
        assert img.mode == 'P'                              # 256-colour palette, as the README's pictures
    assert_real_image(png)
    with pytest.raises(UserError, match='give RUN or GENOTYPE'):
        draw.main(RUN=run, GENOTYPE='NAS_HBO_PAPER', OUT=png)
    with pytest.raises(UserError, match='nothing to draw'):
        draw.main(RUN=str(tmp_path))
    with pytest.raises(UserError, match='nothing to draw: give a run folder'):
        draw.main()


def test_retrain_saves_test_probabilities_and_normalization(cubes, retrain_run):
    run = retrain_run['run']
    table = data.read_table(cubes)
    for result in retrain_run['folds']:
        f = result['fold']
        probs = pd.read_csv(os.path.join(run, f'probs_fold{f}.csv'), dtype={'nodule_id': str})
        test = table[table['fold'] == f]
        assert probs['nodule_id'].tolist() == test['nodule_id'].tolist()
        assert probs['label'].tolist() == test['label'].tolist()
        assert binary_metrics(probs['label'], probs['prob'])['acc'] == pytest.approx(result['acc'])
        with open(os.path.join(run, f'norm_fold{f}.json')) as fh:
            norm = json.load(fh)
        train = table[table['fold'] != f]
        assert (norm['mean'], norm['std']) == pytest.approx(data.cube_stats(data.load_cubes(cubes, train, 8)))
        assert norm['train_folds'] == sorted(set(train['fold']))
    for name in RETRAIN_PNGS:  # the k-fold table is cropped to its two rows
        assert_real_image(os.path.join(run, name), (80, 400) if name == 'kfold_table.png' else (200, 400))


def test_last_changes_and_kept_auc():
    a = [('skip_connect', 0), ('sep_conv_3x3x3', 1)]
    b = [('skip_connect', 0), ('max_pool_3x3x3', 1)]
    c = [('max_pool_3x3x3', 1), ('skip_connect', 0)]
    # one node, 2 edges: edge 1 changes op at epoch 4; listing the same edges in another order (c) is no change
    assert runs.last_changes({3: a, 4: b, 5: c, 6: b}, 2) == [3, 4]
    d = [('skip_connect', 0), ('max_pool_3x3x3', 1), ('sep_conv_3x3x3', 2), ('skip_connect', 0)]
    assert runs.edge_choices(d, 5) == ['skip_connect', 'max_pool_3x3x3', 'skip_connect', None,
                                             'sep_conv_3x3x3']
    keep = [(torch.tensor([0.2, 0.9]), torch.tensor([0, 1])), (torch.tensor([0.6, 0.4]), torch.tensor([0, 1]))]
    assert engine.kept_auc(keep) == pytest.approx(75.0)   # pairs (malignant > benign): 0.9>0.2, 0.9>0.6, 0.4>0.2
    assert np.isnan(engine.kept_auc([]))


def test_older_retrain_folder_without_probabilities(retrain_run, tmp_path):
    old = shutil.copytree(retrain_run['run'], tmp_path / 'old',
                          ignore=shutil.ignore_patterns('probs_fold*', '*.png', '*.pt'))
    lines = []
    written = runs.draw_run(str(old), log=lines.append)
    assert sorted(os.path.basename(p) for p in written) == ['cells.png', 'kfold_table.png', 'retrain_curves.png']
    assert lines == [f'{old}: no probs_fold*.csv (a run from before they were saved): no ROC or confusion figure']


# ---------------------------------------------------------------- the numbers behind the evaluation figures

def test_roc_points_and_auc_of_a_known_case():
    # benign 0.1, 0.4; malignant 0.35, 0.8 (malignant positive). Thresholds 0.8, 0.4, 0.35, 0.1 give
    # (fpr, tpr) (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1); AUC = share of (malignant, benign) pairs ranked right = 3/4
    fpr, tpr, auc = evaluation.roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert auc == pytest.approx(0.75)
    # a perfect ranking and a chance line: the mean curve averages the true positive rates at each fpr, from (0, 0)
    grid = np.array([0.0, 0.5, 1.0])
    mean = evaluation.mean_roc([([0, 0, 1], [0, 1, 1]), ([0, 1], [0, 1])], grid)
    assert mean.tolist() == [0.0, 0.75, 1.0]


def test_confusion_counts_rows_are_the_true_class():
    # true benign: 0.2, 0.7 (predicted malignant), 0.1; true malignant: 0.9, 0.5 (>= 0.5: malignant), 0.3, 0.2
    m = evaluation.confusion([0, 0, 0, 1, 1, 1, 1], [0.2, 0.7, 0.1, 0.9, 0.5, 0.3, 0.2])
    assert m.tolist() == [[2, 1], [2, 2]]  # [[TN, FP], [FN, TP]]: rows true (benign, malignant), columns predicted


def drawn(monkeypatch, plot, run_path):
    """The figure a plot function draws, kept instead of saved."""
    monkeypatch.setattr(evaluation, 'save', lambda fig, path, **kw: fig)
    return plot(str(run_path))


def write_probs(run_path, fold, labels, probs):
    pd.DataFrame({'nodule_id': [str(i) for i in range(len(labels))], 'label': labels, 'prob': probs}).to_csv(
        os.path.join(run_path, f'probs_fold{fold}.csv'), index=False)


def test_roc_figure_draws_the_fold_curve_and_its_auc(tmp_path, monkeypatch):
    write_probs(tmp_path, 3, [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    ax = drawn(monkeypatch, evaluation.plot_roc, tmp_path).axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith('fold 3'))
    assert line.get_label() == 'fold 3 (AUC 0.750, n=4)'
    assert list(line.get_xdata()) == [0, 0, 0.5, 0.5, 1] and list(line.get_ydata()) == [0, 0.5, 0.5, 1, 1]
    assert ax.get_xlabel().startswith('false positive rate') and ax.get_ylabel().startswith('true positive rate')


def test_confusion_figure_puts_the_true_class_on_the_rows(tmp_path, monkeypatch):
    write_probs(tmp_path, 0, [0, 0, 0, 1, 1, 1, 1], [0.2, 0.7, 0.1, 0.9, 0.5, 0.3, 0.2])
    ax = drawn(monkeypatch, evaluation.plot_confusion, tmp_path).axes[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ('true', 'predicted')
    assert [t.get_text() for t in ax.get_yticklabels()] == ['benign', 'malignant']
    cells = {tuple(int(round(v)) for v in t.get_position()): t.get_text() for t in ax.texts}
    # text at (x = predicted, y = true row): count and the share of its true class
    assert cells == {(0, 0): '2\n67%', (1, 0): '1\n33%', (0, 1): '2\n50%', (1, 1): '2\n50%'}


# ---------------------------------------------------------------- a run folder drawn whole, or one line and nothing

from test_plots import one_fold_run, texts  # noqa: E402

from figures import search  # noqa: E402


def pngs(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith('.png'))


def evolve_run(root):
    """An evolutionary search's run folder as train_evolve writes it (its figure reads evaluations.csv)."""
    run = root / 'runs' / 'train_evolve-20260101-000000-000000'
    run.mkdir(parents=True)
    (run / 'config.json').write_text('{"POPULATION": 4}')
    (run / 'evaluations.csv').write_text('index,generation,params,f1\n0,0,12000,0.5\n1,0,30000,0.3\n2,1,20000,0.4\n')
    return str(run)


def test_draw_redraws_an_evolve_run(tmp_path, capsys):
    run = evolve_run(tmp_path)
    assert draw.main(RUN=run) == [os.path.join(run, 'pareto.png')]  # was 'nothing to draw'
    assert_real_image(os.path.join(run, 'pareto.png'))
    assert capsys.readouterr().out == f'written {os.path.join(run, "pareto.png")}\n'


PLOTS = {  # each figure function with the inputs it needs, writing over an earlier PNG
    'roc': lambda root, png: evaluation.plot_roc(one_fold_run(root), png),
    'weights': lambda root, png: search.plot_op_weights(
        root / 'w.csv', png) if (root / 'w.csv').write_text('epoch,cell,edge,op,weight\n0,normal,0,a,0.5\n') else 0,
    'cells': lambda root, png: diagrams.plot_genotype('NAS_HBO_PAPER', png),
    'pareto': lambda root, png: search.plot_pareto(os.path.join(evolve_run(root), 'evaluations.csv'), png),
    'palette': lambda root, png: runs.to_palette(png),
}


@pytest.mark.parametrize('plot', PLOTS)
def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch, plot):
    # a kill while the PNG is written: the earlier picture stays, no half PNG under the final name, nothing left over
    png = tmp_path / 'out' / 'figure.png'
    png.parent.mkdir()
    diagrams.plot_genotype('NAS_HBO_PAPER', png)
    before = png.read_bytes()

    def half_then_killed(real):
        def write(*args, **kwargs):
            path = args[1] if isinstance(args[0], Image.Image) else args[0]  # Image.save(self, path), imsave(path)
            if not isinstance(path, (str, os.PathLike)):  # a layout pass drawing into memory
                return real(*args, **kwargs)
            with open(path, 'wb') as f:
                f.write(before[:100])
            raise KeyboardInterrupt
        return write
    import matplotlib.image
    monkeypatch.setattr(matplotlib.image, 'imsave', half_then_killed(matplotlib.image.imsave))
    monkeypatch.setattr(Image.Image, 'save', half_then_killed(Image.Image.save))
    with pytest.raises(KeyboardInterrupt):
        PLOTS[plot](tmp_path, png)
    assert png.read_bytes() == before and os.listdir(png.parent) == ['figure.png']


@pytest.mark.parametrize('damage', ['result', 'metrics_fold', 'config', 'genotype'])
def test_every_input_is_checked_before_the_first_figure(tmp_path, damage):
    run = one_fold_run(tmp_path)
    if damage == 'result':      # read by the last figure: three were written before it was found
        open(os.path.join(run, 'result_fold5.json'), 'w').write('{"fold": 5, "acc": ')
        message = r'result_fold5\.json cannot be read .*: delete it to evaluate fold 5 again'
    elif damage == 'metrics_fold':
        open(os.path.join(run, 'metrics_fold5.csv'), 'w').write('epoch,train_loss\n0,0.7\n')
        message = r'metrics_fold5\.csv, line 2: train_acc, test_loss, test_acc not a number .*--RESUME='
    elif damage == 'config':
        open(os.path.join(run, 'config.json'), 'w').write('{"GENOTYPE": ')
        message = r'config\.json cannot be read .*log\.txt holds the same settings'
    else:
        open(os.path.join(run, 'genotype.json'), 'w').write('{"normal": [["skip_connect"')
        message = r'genotype file .*genotype\.json: cannot read json'
    with pytest.raises(UserError, match=message):
        runs.draw_run(run, log=lambda line: None)
    assert pngs(run) == []


@pytest.mark.parametrize('name,remedy', [
    ('probs_fold5.csv', r'delete result_fold5\.json and probs_fold5\.csv and continue the run \(python '
                        r'train_3D_continuation\.py --RESUME=.*\) to evaluate the fold again'),
    ('metrics_fold5.csv', r'fold 5 has no finished epoch; .*continue the run \(python train_3D_continuation\.py '
                          r'--RESUME=.*\), or delete the file to draw the other folds'),
])
def test_an_empty_fold_csv_says_what_to_do(tmp_path, name, remedy):
    run = one_fold_run(tmp_path)
    with open(os.path.join(run, name)) as f:
        header = f.readline()
    open(os.path.join(run, name), 'w').write(header)
    with pytest.raises(UserError, match=rf'{name}: no data rows: .*{remedy}'):
        runs.draw_run(run, log=lambda line: None)
    assert pngs(run) == []


def test_retrain_curves_legend_names_folds_and_line_styles(tmp_path, monkeypatch):
    run = one_fold_run(tmp_path)
    fig = drawn(monkeypatch, evaluation.plot_retrain_curves, run)
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert legend == ['test fold 5', 'train (other folds)', 'test (the held-out fold)']
    styles = {ln.get_label(): ln.get_linestyle() for ax in fig.axes for ln in ax.get_lines()}
    assert styles == {'fold 5 train': '--', 'fold 5 test': '-'}


def test_kfold_table_image_is_cropped_to_the_table(tmp_path):
    run = one_fold_run(tmp_path)
    img = np.asarray(Image.open(evaluation.plot_kfold_table(run, str(tmp_path / 't.png'))).convert('L'))
    blank_rows = (img > 250).all(1)
    assert blank_rows.mean() < 0.4, blank_rows.mean()  # the table in the middle of a blank image: 0.54 blank


def test_cell_labels_keep_off_crossings_and_the_dashed_lines_are_named(monkeypatch):
    # a horizontal edge (0, 0) -> (2, 0) crossed at its middle by a vertical one: the label moves along its own edge
    crossing = np.column_stack([np.ones(41), np.linspace(-1, 1, 41)])
    w, h = diagrams.label_size('skip_connect')
    x, y = diagrams.label_spot((w, h), ((0, 0), (1, 0), (2, 0)), crossing, [], 0.5)
    assert y == 0 and abs(x - 1) > w / 2 and 0.3 <= x <= 1.7
    taken = []
    assert diagrams.label_spot((w, h), ((0, 0), (1, 0), (2, 0)), np.zeros((0, 2)), taken, 0.5) == (1, 0)
    assert taken == [(1, 0, w, h)]  # the next label avoids this one
    # an arc (0, 0) -> (4, 0) bent by -0.2 peaks at (2, 0.4), through a node box there: bent on in steps of 0.08
    # until every point clears the box (+0.08 margin): -0.36 still grazes it at x = 1.52, -0.44 passes above
    assert diagrams.clear_rad((0, 0), (4, 0), -0.2, []) == -0.2
    assert diagrams.clear_rad((0, 0), (4, 0), -0.2, [(2, 0.4)]) == pytest.approx(-0.44)
    figs = []
    monkeypatch.setattr(diagrams, 'save', lambda fig, path: figs.append(fig) or path)
    diagrams.plot_genotype('NAS_HBO_PAPER', 'unused.png')
    assert any('grey dashed arrows: the nodes concatenated into the cell output' in t for t in texts(figs[0]))
