"""TensorBoard event files (tboard.py), read back with TensorBoard's own event reader and through a real TensorBoard
server: they hold what the run's CSVs hold, step for step, after a kill and a resume too. Tiny runs (C=4, 3 cells,
8^3 crops); a kill is simulated by raising from the checkpoint writer right after an epoch's events were written."""
import csv
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from conftest import write_cube_set
from matplotlib.image import imsave
from test_evolve import TINY, fake_candidate
from test_syncfree import Guard, search_step, step_counters

import engine
import genotypes
import settings
import tboard
import train_3D_continuation as retrain
import train_evolve
import train_search
from figures import search as search_figures
from utils import UserError

pytest.importorskip('tensorboard', reason='the tensorboard package is not installed (requirements.txt)')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

OPS = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')
SEARCH = dict(DEVICE='cpu', C=4, LAYERS=3, CUBE=8, BATCH_SIZE=3, SEARCH_FOLDS=(0, 1, 2), VAL_FRACTION=0.34,
              PRIMITIVES=OPS, EPOCHS=3, WARMUP_EPOCHS=1, SEED=3, HYPERGRAD='first', WEIGHTS='sparsemax',
              ZERO_ONE='l2', TAU_EVERY=1, TAU_FACTOR=0.5)
EVOLVE = {**TINY, 'GENERATIONS': 2}  # initialization and one learning generation of 4 candidates each
RETRAIN = dict(C=4, LAYERS=3, CUBE=8, BATCH_SIZE=4, DEVICE='cpu', SEED=0, FOLD=8, EPOCHS=3, DROP_PATH=0.3)


class Killed(Exception):
    """A simulated kill."""


@pytest.fixture(scope='module')
def cubes(tmp_path_factory):
    return write_cube_set(tmp_path_factory.mktemp('set'), scans_per_fold=2, nodules_per_scan=2, size=8)


def only_folder(runs):
    (name,) = os.listdir(runs)
    return os.path.join(runs, name)


def kill_at_checkpoint(monkeypatch, epoch):
    """The checkpoint of `epoch` is never written: its events are, so the resume must drop them."""
    real = engine.save_state

    def save_state(path, at, *args, **kwargs):
        if at == epoch:
            raise Killed
        return real(path, at, *args, **kwargs)
    monkeypatch.setattr(engine, 'save_state', save_state)


def events(folder):
    """The folder's event stream as written: without the reader's purge of the steps a restart marks (purge_step),
    which would hide steps written twice from this reader, not from all (TensorBoard's fast loader)."""
    acc = EventAccumulator(folder, size_guidance={'scalars': 0, 'tensors': 0, 'images': 0}, purge_orphaned_data=False)
    acc.Reload()
    return acc


def series(acc, tag):
    """[(step, value)] of a scalar tag, in stream order."""
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc, tag):
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag + '/text_summary')}


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def assert_equal_to_csv(acc, rows, extra=()):
    """Every numeric column of a metrics CSV is the series of its tag: the same steps, once each, the same values."""
    epochs = [int(r['epoch']) for r in rows]
    for column in [c for c in rows[0] if c != 'epoch'] + list(extra):
        got = series(acc, tboard.tag_of(column))
        assert [s for s, _ in got] == epochs, column
        want = [float(r[column]) for r in rows]
        assert np.allclose([v for _, v in got], want, rtol=1e-6, equal_nan=True), column


# ---------------------------------------------------------------- train_search.py

@pytest.fixture(scope='module')
def search_run(cubes, tmp_path_factory):
    """A tiny search killed after epoch 1's events but before its checkpoint, then resumed to the end."""
    runs = tmp_path_factory.mktemp('search_runs')
    with pytest.MonkeyPatch.context() as m:
        kill_at_checkpoint(m, 1)
        with pytest.raises(Killed):
            train_search.main(**SEARCH, DATA=cubes, RUNS=str(runs))
    folder = only_folder(runs)
    assert [s for s, _ in series(events(folder), 'loss/val')] == [0, 1]  # epoch 1 is written, not checkpointed
    norms, build = [], train_search.build

    def build_recording(cfg):  # the norm of each architecture step's gradient, as the optimizer receives it
        built = build(cfg)
        built[3].register_step_pre_hook(lambda opt, args, kwargs: norms.append(math.sqrt(sum(
            float(p.grad.pow(2).sum()) for group in opt.param_groups for p in group['params']))))
        return built
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_search, 'build', build_recording)
        out = train_search.main(RESUME=folder)
    return runs, out, norms


def test_search_events_equal_its_csvs_after_a_kill_and_resume(search_run):
    runs, out, norms = search_run
    folder = out['run']
    acc = events(folder)
    assert_equal_to_csv(acc, read_csv(os.path.join(folder, 'metrics.csv')))
    for r in read_csv(os.path.join(folder, 'weights.csv')):
        epoch, cell, edge = int(r['epoch']), r['cell'], int(r['edge'])
        ops = series(acc, f'op_weights_{cell}/edge{edge:02d}/{r["op"]}')
        assert [s for s, _ in ops] == [0, 1, 2] and ops[epoch][1] == pytest.approx(float(r['weight']), abs=1e-7)
        assert series(acc, f'edge_weights_{cell}/edge{edge:02d}')[epoch][1] == pytest.approx(float(r['edge_weight']))
    # the temperature halves every epoch; the architecture steps start after WARMUP_EPOCHS=1
    assert series(acc, 'search/temperature') == [(0, 1.5), (1, 0.75), (2, 0.375)]
    assert len(norms) == 6  # epochs 1 and 2 of the resumed run, 3 architecture steps each: their last ones
    assert series(acc, 'search/hypergradient_norm') == [(1, pytest.approx(norms[2])), (2, pytest.approx(norms[5]))]
    # the zero-one loss of the final alphas/betas (l2: 0.25 - mean (sigmoid - 0.5)^2), from the checkpoint
    state = torch.load(os.path.join(folder, 'last.pt'), weights_only=False)['model']
    s = torch.cat([torch.sigmoid(v).flatten() for k, v in state.items() if k.startswith(('alphas', 'betas'))])
    assert series(acc, 'search/zero_one_loss')[-1] == (2, pytest.approx(float(0.25 - ((s - 0.5) ** 2).mean())))
    final = genotypes.get_genotype(os.path.join(folder, 'genotype.json'))
    genos = text(acc, 'genotype')
    assert sorted(genos) == [0, 1, 2] and genos[2] == tboard.markdown_code(final)
    assert text(acc, 'genotype/final') == {3: tboard.markdown_code(final)}  # step 3: after the 3 epochs
    images = {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()['images']}
    assert sorted(images) == ['figures/cells', 'figures/genotype_evolution', 'figures/search_curves',
                              'figures/weights']
    assert all(len(v) == 1 and v[0][0] == 3 and min(v[0][1:]) > 100 for v in images.values())


@pytest.mark.parametrize('hypergrad', ['second', 'zeroth'])
def test_search_steps_with_the_board_are_sync_free(hypergrad, tmp_path):
    """The board's copy of each architecture step's hypergradient reads nothing to the host (test_syncfree's guard)."""
    step, a_opt = search_step(hypergrad, 'sparsemax')
    board = tboard.search_board(str(tmp_path), True, None, a_opt, start=1)  # start 1: no layout, no model needed
    step()
    step()  # a zeroth-order architecture step comes every ZO_T=2 weight steps
    board.hypergradient = None
    with Guard(allowed=step_counters(a_opt)):
        for _ in range(4):
            step()
    assert board.hypergradient is not None
    board.close()


def test_tensorboard_off_writes_no_events_and_needs_no_package(cubes, tmp_path, monkeypatch):
    out = train_search.main(**{**SEARCH, 'EPOCHS': 1}, FIGURES=False, TENSORBOARD=False, DATA=cubes,
                            RUNS=str(tmp_path))
    assert not [n for n in os.listdir(out['run']) if 'tfevents' in n]
    monkeypatch.setattr(tboard, 'installed', lambda: False)
    with pytest.raises(UserError, match=r'TENSORBOARD=True: the tensorboard package is not installed \(pip install '
                                        r'tensorboard\); or give --TENSORBOARD=False'):
        settings.resolve({'TENSORBOARD': True}, train_search.DEFAULTS, train_search.RULES)


# ---------------------------------------------------------------- train_3D_continuation.py

def test_retrain_events_equal_its_csv_after_a_kill_and_resume(cubes, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        kill_at_checkpoint(m, 1)
        with pytest.raises(Killed):
            retrain.main(**RETRAIN, DATA=cubes, RUNS=str(tmp_path))
    folder = only_folder(tmp_path)
    out = retrain.main(RESUME=folder)
    fold = os.path.join(folder, 'fold8')
    acc = events(fold)
    rows = read_csv(os.path.join(folder, 'metrics_fold8.csv'))
    assert_equal_to_csv(acc, rows)
    assert series(acc, 'drop_path_prob') == [(e, pytest.approx(0.3 * e / 3)) for e in range(3)]
    run = events(folder)  # the run's own stream: results, figures, settings with final metrics
    (result,) = out['folds']
    assert series(run, 'final/test_auc') == [(3, pytest.approx(result['auc']))]
    table = text(run, 'results/final_epoch')[3].splitlines()
    assert table[0].split() == ['fold', 'acc', 'sens', 'spec', 'f1', 'auc', 'params_M']
    assert table[1].split()[:2] == ['8', f'{result["acc"]:.2f}']
    assert sorted(run.Tags()['images']) == ['figures/cells', 'figures/confusion', 'figures/kfold_table',
                                            'figures/retrain_curves', 'figures/roc']
    session = plugin_data_pb2.HParamsPluginData.FromString(
        run.SummaryMetadata('_hparams_/session_start_info').plugin_data.content).session_start_info
    assert session.hparams['EPOCHS'].number_value == 3 and session.hparams['GENOTYPE'].string_value == 'NAS_HBO_PAPER'
    assert session.hparams['AMP'].string_value == 'False'


# ---------------------------------------------------------------- train_evolve.py

def test_evolve_events_equal_evaluations_after_a_kill_and_resume(cubes, tmp_path, monkeypatch):
    def killed_at_5(cfg, idx, genome, path):  # candidate 5: in generation 1
        if idx == 5:
            raise KeyboardInterrupt
        return fake_candidate(cfg, idx, genome, path)
    # pareto.png, drawn after each candidate, as a 5 x 3 PNG (the figure is tested in test_evolve: not its time)
    monkeypatch.setattr(search_figures, 'plot_pareto', lambda csv, png, *a, **k: imsave(png, np.zeros((3, 5, 3))))
    with monkeypatch.context() as m:
        m.setattr(train_evolve, 'train_candidate', killed_at_5)
        with pytest.raises(KeyboardInterrupt):
            train_evolve.main(**EVOLVE, DATA=cubes, RUNS=str(tmp_path))
    folder = only_folder(tmp_path)
    monkeypatch.setattr(train_evolve, 'train_candidate', fake_candidate)
    out = train_evolve.main(RESUME=folder)
    acc = events(folder)
    rows = read_csv(os.path.join(folder, 'evaluations.csv'))
    for name in tboard.CANDIDATE_NUMBERS:
        want = [(int(r['index']), float(r[name])) for r in rows if r[name] != '']
        got = series(acc, f'candidate/{name}')
        assert [s for s, _ in got] == [s for s, _ in want] == list(range(out['evaluated'])), name
        assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-5), name  # the CSV: 6 digits
    genomes = text(acc, 'candidate')
    assert all(f'genome {list(map(int, r["genome"].split()))}' in genomes[int(r['index'])] for r in rows)
    hv = series(acc, 'search/hypervolume')
    assert [s for s, _ in hv] == [0, 1] and hv[-1][1] == pytest.approx(out['hypervolume'])
    assert [(e.step, e.width, e.height) for e in acc.Images('front')] == [(0, 5, 3), (1, 5, 3)]
    front = read_csv(os.path.join(folder, 'pareto.csv'))
    table = text(acc, 'front')[2]  # after GENERATIONS
    assert [line.split(' | ')[0] for line in table.splitlines()[2:]] == [f'| {r["index"]}' for r in front]


# ---------------------------------------------------------------- a real TensorBoard server

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def get_json(url):
    import json
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_a_tensorboard_server_serves_the_search_curves(search_run, tmp_path):
    """`tensorboard --logdir` on the finished run answers the scalars of metrics.csv through its HTTP data API."""
    runs, out, _ = search_run
    name = os.path.basename(out['run'])
    port = free_port()
    rows = read_csv(os.path.join(out['run'], 'metrics.csv'))
    log = open(tmp_path / 'tensorboard.log', 'w')
    server = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', str(runs), '--host', '127.0.0.1',
                               '--port', str(port), '--load_fast', 'false', '--reload_interval', '1'],
                              stdout=log, stderr=subprocess.STDOUT)
    base = f'http://127.0.0.1:{port}/data/plugin/scalars'
    try:
        deadline, points = time.monotonic() + 300, []  # generous: a busy machine starts Python and TensorBoard slowly
        while len(points) < len(rows):  # until it answers and has read the whole run
            assert server.poll() is None, open(tmp_path / 'tensorboard.log').read()
            assert time.monotonic() < deadline, 'TensorBoard did not serve the run within 300 s'
            time.sleep(0.5)
            try:
                if 'loss/val' in get_json(base + '/tags').get(name, {}):
                    points = get_json(base + '/scalars?' + urllib.parse.urlencode({'run': name, 'tag': 'loss/val'}))
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert [p[1] for p in points] == [int(r['epoch']) for r in rows]
    assert [p[2] for p in points] == pytest.approx([float(r['val_loss']) for r in rows], rel=1e-6)
    assert all(math.isfinite(p[0]) for p in points)  # wall times
