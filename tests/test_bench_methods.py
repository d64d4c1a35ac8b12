"""bench.py --BENCH=methods: the sizing from injected step times (worked examples, no clock), the comparison's
control flow within a budget (stub entries, a fake clock), and its tiny CPU version end to end (a library missing)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import write_cube_set
from test_bench import NO_EXTRAS

import bench
from benchmarks import methods, sizing
from benchmarks.gpu import OverBudget

# ---------------------------------------------------------------- sizing: worked examples
# Passes: search-train 70 cubes / 7 = 10 steps, search-val 35 / 7 = 5; retrain 90 / 4 = 23 steps, test 10 / 4 = 3;
# a candidate 70 / 4 = 18 steps, evaluations of 18 + 9 batches. With FORWARD_SHARE 0.5 and 1 s overhead per run:
# search(E) = 1 + W * 10 * 0.1 + (E - W) * 10 * step + E * 5 * 0.5 * 0.1, W = E // 2 warm-up epochs, so
#   E:          1      2     3      4     5      6     7      8     9
#   2nd (0.4)   5.25   6.5   10.75  12    16.25  17.5  21.75  23    27.25
#   1st (0.2)   3.25   4.5   6.75   8     10.25  11.5  13.75  15    17.25
#   zeroth      2.75   4     5.75   7     8.75   10    11.75  13    14.75   (0.15 s a step)
#   all three   11.25  15    23.25  27    35.25  39    47.25  51    59.25
# retrain of one genotype = 1 + E * (23 + 0.5 * 3) * 0.05 = 1 + 1.225 E; a candidate (1 epoch) = (18 + 0.5 * 27) *
# 0.02 = 0.63 s.
STEP_S = {'search warm-up': 0.1, 'search 2nd': 0.4, 'search 1st': 0.2, 'search zeroth': 0.15, 'retrain': 0.05,
          'candidate': 0.02}
SIZES = {'search_train': 70, 'search_val': 35, 'retrain': [[90, 10]]}
LIMITS = {'search_epochs': 50, 'retrain_epochs': 100, 'population': 10, 'generations': 40, 'candidate_epochs': 1,
          'search_batch': 7, 'retrain_batch': 4, 'evolve_batch': 4, 'search_share': 0.5, 'overhead_s': 1.0}
ALL = ['search 2nd', 'search 1st', 'search zeroth']


def test_costs_follow_the_worked_example():
    assert [sizing.search_s(e, 0.4, 0.1, SIZES, 7, 1.0) for e in (1, 4, 9)] == pytest.approx([5.25, 12, 27.25])
    assert sizing.retrain_s(3, 0.05, SIZES, 4, 1.0) == pytest.approx(1 + 3 * 1.225)
    assert sizing.retrain_s(1, 0.05, {'retrain': [[90, 10], [80, 20]]}, 4, 0.0) == pytest.approx((24.5 + 22.5) * 0.05)
    assert sizing.candidate_s(2, 0.02, SIZES, 4) == pytest.approx(2 * 0.63)


def test_plan_splits_the_budget_between_searches_and_retrains():
    # 100 s: 90 usable, 45 for the searches, 45 for 8 retrained genotypes (3 searches, the evolutionary one, 4
    # references): 8 (1 + 1.225 E) <= 45 gives E = 3. The DARTS-style searches get 3/4 of 45 = 33.75 s: 4 epochs
    # (27 s; 5 would take 35.25). The evolutionary search: 45 - 27 - 1 = 17 s, 26 candidates of 0.63 s: a population of
    # 26 // 4 = 6 for 4 generations (24 candidates, 1 + 24 * 0.63 = 16.12 s).
    p = sizing.plan(STEP_S, SIZES, 100.0, LIMITS, ALL, True, 4)
    assert (p['search_epochs'], p['warmup_epochs'], p['retrain_epochs']) == (4, 2, 3)
    assert (p['population'], p['generations'], p['candidate_epochs']) == (6, 4, 1)
    assert p['search_s'] == pytest.approx({'search 2nd': 12, 'search 1st': 8, 'search zeroth': 7})
    assert p['evolve_s'] == pytest.approx(16.12) and p['retrain_s'] == pytest.approx(4.675)
    assert p['planned_s'] == pytest.approx(27 + 16.12 + 8 * 4.675) and p['planned_s'] <= p['usable_s'] == 90
    assert p['dropped'] == {} and p['darts'] == ALL and p['evolve']


def test_a_side_held_by_its_limit_passes_its_time_to_the_other():
    # retrains held at 2 epochs: 45 - 8 * 3.45 = 17.4 s more for the searches (62.4 s): 46.8 s for the DARTS-style
    # ones gives 6 epochs (39 s; 7 take 47.25), the evolutionary search 62.4 - 39 - 1 = 22.4 s: 35 candidates, 8 x 4
    p = sizing.plan(STEP_S, SIZES, 100.0, {**LIMITS, 'retrain_epochs': 2}, ALL, True, 4)
    assert (p['retrain_epochs'], p['search_epochs'], p['population'], p['generations']) == (2, 6, 8, 4)
    assert p['search_budget_s'] == pytest.approx(62.4) and p['retrain_budget_s'] == pytest.approx(27.6)
    # searches held at 1 epoch (no evolutionary search): 45 - 11.25 s more for 7 genotypes: 7 (1 + 1.225 E) <= 78.75
    p = sizing.plan(STEP_S, SIZES, 100.0, {**LIMITS, 'search_epochs': 1}, ALL, False, 4)
    assert (p['search_epochs'], p['retrain_epochs']) == (1, 8) and p['retrain_budget_s'] == pytest.approx(78.75)
    assert p['search_budget_s'] == pytest.approx(11.25)


def test_a_search_that_does_not_fit_is_dropped_the_costliest_first():
    # zeroth order at 4 s a step: one epoch of it alone (1 + 40 + 0.25 s) exceeds the 33.75 s of the three; without
    # it the other two share 2/3 of 45 s = 30 s: 6 epochs (17.5 + 11.5 s; 7 take 35.5 s), and the evolutionary
    # search 45 - 29 - 1 = 15 s: 23 candidates, 5 x 4; 7 genotypes left to retrain: 7 (1 + 1.225 E) <= 45, E = 4
    p = sizing.plan({**STEP_S, 'search zeroth': 4.0}, SIZES, 100.0, LIMITS, ALL, True, 4)
    assert list(p['dropped']) == ['search zeroth'] and 'not one search epoch fits' in p['dropped']['search zeroth']
    assert p['darts'] == ['search 2nd', 'search 1st'] and p['search_epochs'] == 6
    assert p['search_s'] == pytest.approx({'search 2nd': 17.5, 'search 1st': 11.5})
    assert (p['population'], p['generations'], p['retrain_epochs']) == (5, 4, 4)
    # a candidate of 15.75 s: 17 s hold one, fewer than 3 x 2; the three DARTS-style searches then get all 45 s:
    # 6 epochs
    p = sizing.plan({**STEP_S, 'candidate': 0.5}, SIZES, 100.0, LIMITS, ALL, True, 4)
    assert list(p['dropped']) == ['evolutionary'] and not p['evolve'] and p['population'] == 0
    assert p['search_epochs'] == 6 and p['evolve_s'] == 0


def test_without_a_retrain_epoch_the_costliest_searches_go_first():
    # 30 s: 13.5 s for the retrains hold not one epoch of 8 genotypes (8 x 2.225 s). Smallest runs: 2nd order 5.25 s,
    # the evolutionary search 1 + 6 x 0.63 = 4.78 s, 1st order 3.25 s, zeroth 2.75 s: 2nd order goes, then the
    # evolutionary search; 6 genotypes fit one epoch (13.35 s), and the 13.5 s of the two searches left 3 epochs
    # (12.5 s)
    p = sizing.plan(STEP_S, SIZES, 30.0, LIMITS, ALL, True, 4)
    assert list(p['dropped']) == ['search 2nd', 'evolutionary'] and p['darts'] == ['search 1st', 'search zeroth']
    assert p['dropped']['evolutionary'].startswith('not one retrain epoch fits')
    assert (p['retrain_epochs'], p['search_epochs'], p['planned_s']) == (1, 3, pytest.approx(12.5 + 6 * 2.225))
    assert sizing.smallest_runs(STEP_S, SIZES, LIMITS, ALL, True) == pytest.approx(
        {'search 2nd': 5.25, 'search 1st': 3.25, 'search zeroth': 2.75, 'evolutionary': 4.78})
    # 20 s: not even 5 genotypes fit (5 x 2.225 > 9 s): every search goes, the 4 references get the 18 s usable:
    # 4 (1 + 1.225 E) <= 18 gives E = 2
    p = sizing.plan(STEP_S, SIZES, 20.0, LIMITS, ALL, True, 4)
    assert list(p['dropped']) == ['search 2nd', 'evolutionary', 'search 1st', 'search zeroth']
    assert p['darts'] == [] and not p['evolve']
    assert (p['retrain_epochs'], p['search_epochs'], p['planned_s']) == (2, 0, pytest.approx(4 * 3.45))
    p = sizing.plan(STEP_S, SIZES, 5.0, LIMITS, [], False, 4)  # 4.5 s: not even the references
    assert p['retrain_epochs'] == 0 and p['planned_s'] == 0


def test_evolution_size_takes_a_quarter_as_population():
    assert sizing.evolution_size(5, 10, 40) == (0, 0)
    assert sizing.evolution_size(6, 10, 40) == (3, 2)
    assert sizing.evolution_size(12, 10, 40) == (3, 4)
    assert sizing.evolution_size(23, 10, 40) == (5, 4)
    assert sizing.evolution_size(1000, 10, 40) == (10, 40)
    assert sizing.evolution_size(60, 10, 3) == (10, 3)


# ---------------------------------------------------------------- the comparison's control flow: stubs, a fake clock

class Clock:
    """Seconds that move only when a test moves them."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def settings_of(tmp_path, **overrides):
    cubes = write_cube_set(tmp_path / 'cubes', size=12)
    return bench.settings.resolve({'BENCH': 'methods', 'DEVICE': 'cpu', 'CUBE': 12, 'METHODS_DATA': cubes,
                                   'METHODS_RUNS': str(tmp_path / 'runs'), 'METHODS_OUT': str(tmp_path / 'r.json'),
                                   'METHODS_OVERHEAD_S': 1.0, **overrides}, bench.DEFAULTS, bench.RULES)


def fake_result(row, auc):
    methods.fill_results(row, {'folds': [{'fold': 5, 'acc': 75.0, 'sens': 50.0, 'spec': 100.0, 'f1': 66.7, 'auc': auc,
                                          'params_M': 0.1}], 'run': 'retrain-run'}, 2.0)


def test_entries_run_within_the_budget_and_each_outcome_is_marked(tmp_path, monkeypatch):
    """pymoo missing: the evolutionary search is skipped with its reason and gets no budget; a search the plan drops,
    an entry stopped at the budget's end, one that fails, one whose library is missing are marked and the others go
    on; once the clock passes the budget the entries left are not started; the JSON holds each outcome as soon as
    it is known."""
    monkeypatch.setitem(sys.modules, 'pymoo', None)  # `import pymoo` raises ModuleNotFoundError
    clock, seen, cfg = Clock(), {}, settings_of(tmp_path, METHODS_RANDOM_SEEDS=2, GPU_BUDGET_S=100.0)

    def fake_measure(cfg, kinds, graphed, res, save, start_budget):
        res['first_use_s'].update(dict.fromkeys(kinds, 1.0))
        clock.t += 50.0  # the first use is outside the budget
        start_budget()
        # 2nd order at 30 s a step: 1 + 2 x 30 + 0.1 s for one epoch, more than the 40.5 s of the searches
        res['step_s'].update({k: 30.0 if k == 'search 2nd' else STEP_S[k] for k in kinds})
        seen['kinds'] = kinds

    def entry(name, search=None, same=None):
        def run(row, save):
            if same is not None:
                seen.setdefault('same', []).append(same)
            if name == 'gbt':
                clock.t += 10.0
            if name == 'first':
                seen['search'] = search
                raise OverBudget()
            if name == 'zeroth':
                raise RuntimeError('boom')
            if name == 'paper':
                saved = {r['method']: r['status'] for r in json.load(open(tmp_path / 'r.json'))['methods']}
                seen['on disk'] = (saved['first, sigmoid'], saved['zeroth, sparsemax'])
            if name == 'random0':
                clock.t += 1000.0
                raise ModuleNotFoundError("No module named 'SimpleITK'")
            fake_result(row, 90.0)
        return run
    monkeypatch.setattr(methods.measure, 'measure', fake_measure)
    monkeypatch.setattr(methods, 'darts_entry', lambda hypergrad, weights, search, same: entry(hypergrad, search, same))
    monkeypatch.setattr(methods, 'evolve_entry', lambda evolve, same: entry('evolve'))
    monkeypatch.setattr(methods, 'reference_entry', lambda genotype, tag, same: entry(tag.split('-')[1], same=same))
    monkeypatch.setattr(methods, 'gbt_entry', lambda cfg: entry('gbt'))
    res = methods.run(cfg, clock)
    saved = json.load(open(tmp_path / 'r.json'))
    assert saved['finished'] and [r['status'] for r in saved['methods']] == [
        'cut', 'cut', 'failed', 'skipped', 'done', 'skipped', 'cut', 'done']
    rows = {r['method']: r for r in saved['methods']}
    assert rows[methods.EVOLVE]['reason'].startswith('needs pymoo, which cannot be imported here')
    assert 'candidate' not in seen['kinds'] and not saved['plan']['evolve'] and saved['plan']['population'] == 0
    assert rows['second, sigmoid']['reason'].startswith('does not fit the budget: not one search epoch fits')
    assert rows['first, sigmoid']['reason'].startswith('stopped at the end of the budget')
    assert rows['zeroth, sparsemax']['reason'] == 'RuntimeError: boom'
    assert rows[methods.random_name(0)]['reason'] == "a library is missing: No module named 'SimpleITK'"
    assert rows[methods.random_name(1)]['reason'].startswith('not started: ')
    assert seen['on disk'] == ('cut', 'failed')  # written before the next entry started
    # the plan for the 90 s the baseline left: what the entries were given
    p = saved['plan']
    assert p['budget_s'] == 90.0 and p['darts'] == ['search 1st', 'search zeroth']
    assert seen['search']['EPOCHS'] == p['search_epochs'] > 0 and seen['search']['WARMUP_EPOCHS'] == p['warmup_epochs']
    same = seen['same'][0]
    assert all(s == same for s in seen['same']) and same['EPOCHS'] == p['retrain_epochs'] > 0
    assert (same['TEST_FOLDS'], same['LR'], same['C'], same['FOLD']) == ((5,), 0.025, 16, 'all')
    assert rows['first, sigmoid']['planned_s'] == pytest.approx(p['search_s']['search 1st'] + p['retrain_s'])
    assert saved['first_use_s'] == dict.fromkeys(seen['kinds'], 1.0) and saved['budget_used_s'] == 1010.0
    assert saved['elapsed_s'] == 1060.0 and res['paths'] == [str(tmp_path / 'r.json')]
    table = methods.methods_table(saved).splitlines()
    assert table[0] == '| method | status | search | retrain | params | fold 5 AUC | fold 5 acc | mean AUC | mean acc |'
    assert table[6] == '| reference: paper genotype | done |  | 2 s | 0.100 M | 90.00 | 75.00 | 90.00 | 75.00 |'
    assert table[9] == ('| baseline: gradient boosting (nodclsgbt.py) | done |  | 2 s | 0.100 M | 90.00 | 75.00 | '
                        '90.00 | 75.00 |')
    assert 'zeroth, sparsemax: failed: RuntimeError: boom' in table


def test_bad_settings_and_a_missing_cube_set_are_one_line_errors_before_anything_is_written(tmp_path):
    runs = str(tmp_path / 'runs')
    with pytest.raises(bench.utils.UserError, match="METHODS_CUDA_GRAPHS='on' needs a CUDA device"):
        bench.main(BENCH='methods', DEVICE='cpu', METHODS_CUDA_GRAPHS='on', METHODS_RUNS=runs)
    with pytest.raises(bench.utils.UserError, match=r'nowhere does not exist .*; or build the cube set where that '
                                                    r'works and copy its folder here \(docs/gpu.md'):
        bench.main(BENCH='methods', DEVICE='cpu', METHODS_DATA=str(tmp_path / 'nowhere'), METHODS_RUNS=runs)
    cubes = write_cube_set(tmp_path / 'cubes', size=12)
    with pytest.raises(bench.utils.UserError, match=r'METHODS_FOLDS include fold 12, which has no nodules'):
        bench.main(BENCH='methods', DEVICE='cpu', METHODS_DATA=cubes, METHODS_FOLDS=(12,), METHODS_RUNS=runs)
    assert not os.path.exists(runs)


# ---------------------------------------------------------------- the tiny CPU version, end to end

TINY = {'DEVICE': 'cpu', 'CUBE': 12, 'METHODS_C': 4, 'METHODS_LAYERS': 3, 'METHODS_RETRAIN_C': 4,
        'METHODS_RETRAIN_LAYERS': 3, 'METHODS_EPOCHS': 2, 'METHODS_RETRAIN_EPOCHS': 1, 'METHODS_EVOLVE_POPULATION': 3,
        'METHODS_EVOLVE_GENERATIONS': 2, 'METHODS_EVOLVE_EPOCHS': 1, 'METHODS_EVOLVE_FILTERS': (4,),
        'METHODS_EVOLVE_CELLS': (3,), 'METHODS_RANDOM_SEEDS': 1, 'METHODS_MEASURE_STEPS': 1,
        'METHODS_OVERHEAD_S': 1.0}
KEYS = {'meta', 'data', 'graphs', 'first_use_s', 'step_s', 'plan', 'methods', 'notes', 'budget_s', 'budget_used_s',
        'finished', 'elapsed_s'}


def config(run):
    return json.load(open(os.path.join(run, 'config.json')))


def test_tiny_comparison_retrains_every_genotype_the_same_way(tmp_path, monkeypatch, capsys):
    """Tiny, on the CPU, with a budget the limits hold (one DARTS-style search keeps it short): the settings each
    entry ran with are the plan's, every genotype is retrained the same way, the baseline tests the same folds."""
    monkeypatch.setattr(methods, 'DARTS', methods.DARTS[1:2])
    cubes = write_cube_set(tmp_path / 'cubes', size=12)
    bench.main(BENCH='methods', **TINY, METHODS_DATA=cubes, METHODS_RUNS=str(tmp_path / 'runs'),
               METHODS_OUT=str(tmp_path / 'r.json'), GPU_BUDGET_S=3600.0)
    saved = json.load(open(tmp_path / 'r.json'))
    assert set(saved) == KEYS and saved['finished'] and saved['notes'] == []
    rows = {r['method']: r for r in saved['methods']}
    assert list(rows) == ['first, sigmoid', methods.EVOLVE, methods.PAPER, methods.random_name(0), methods.GBT]
    assert all(set(r) == set(methods.ROW_KEYS) and r['status'] == 'done' for r in rows.values()), rows
    kinds = ['retrain', 'search warm-up', 'search 1st', 'candidate']
    assert list(saved['first_use_s']) == kinds and list(saved['step_s']) == kinds
    assert min(saved['step_s'].values()) > 0
    p = saved['plan']  # the limits hold: 2 search epochs, 3 x 2 candidates of 1 epoch, 1 retrain epoch
    assert (p['search_epochs'], p['population'], p['generations'], p['retrain_epochs']) == (2, 3, 2, 1)
    search = config(rows['first, sigmoid']['search_run'])
    assert (search['EPOCHS'], search['WARMUP_EPOCHS'], search['C'], search['HYPERGRAD']) == (2, 1, 4, 'first')
    evolve = config(rows[methods.EVOLVE]['search_run'])
    assert (evolve['POPULATION'], evolve['GENERATIONS'], evolve['EPOCHS'], evolve['CELLS']) == (3, 2, 1, [3])
    retrained = [config(r['retrain_run']) for r in list(rows.values())[:4]]
    assert {(c['C'], c['LAYERS'], c['LR'], c['EPOCHS'], tuple(c['TEST_FOLDS']), c['FOLD']) for c in retrained} == {
        (4, 3, 0.025, 1, (5,), 'all')}
    assert retrained[1]['GENOTYPE'].startswith(rows[methods.EVOLVE]['search_run'])
    assert retrained[2]['GENOTYPE'] == 'NAS_HBO_PAPER'
    for r in rows.values():
        assert list(r['folds']) == ['5'] and r['mean']['acc'] == r['folds']['5']['acc'] and r['retrain_s'] > 0
    gbt = config(rows[methods.GBT]['retrain_run'])
    assert gbt['TEST_FOLDS'] == [5] and gbt['CROP'] is False and rows[methods.GBT]['params_M'] is None
    assert methods.methods_table(saved) in capsys.readouterr().out


def test_tiny_comparison_runs_without_simpleitk_pymoo_and_ray(tmp_path):
    """The GPU machine has no SimpleITK, pymoo, Ray, pylidc or scikit-image: bench.py --BENCH=methods runs in a
    process where importing them fails; the evolutionary search is skipped with its reason, the rest completes (the
    baseline too: nodclsgbt.py needs SimpleITK only to crop scans)."""
    cubes = write_cube_set(tmp_path / 'cubes', size=12)
    args = [f'--{k}={v!r}' if isinstance(v, str) else f'--{k}={v}' for k, v in TINY.items()]
    blocked = ('SimpleITK', 'skimage', 'pymoo', 'ray', 'pylidc')
    done = subprocess.run([sys.executable, '-c', NO_EXTRAS.format(blocked=blocked), '--BENCH=methods', *args,
                           f'--METHODS_DATA={cubes!r}', f'--METHODS_RUNS={str(tmp_path / "runs")!r}',
                           f'--METHODS_OUT={str(tmp_path / "r.json")!r}', '--METHODS_RANDOM_SEEDS=0',
                           '--METHODS_EPOCHS=1', '--GPU_BUDGET_S=3600'], env={**os.environ, 'OMP_NUM_THREADS': '1'},
                          cwd=bench.utils.REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    saved = json.load(open(tmp_path / 'r.json'))
    assert set(saved) == KEYS and saved['finished']
    status = {r['method']: (r['status'], r['reason']) for r in saved['methods']}
    assert status.pop(methods.EVOLVE) == ('skipped', "needs pymoo, which cannot be imported here (No module named "
                                                     "'pymoo' (blocked by the test))")
    assert status == dict.fromkeys(['second, sigmoid', 'first, sigmoid', 'zeroth, sparsemax', methods.PAPER,
                                    methods.GBT], ('done', None))
    assert 'candidate' not in saved['step_s'] and '| zeroth, sparsemax | done |' in done.stdout
