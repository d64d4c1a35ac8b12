"""The evolutionary search (train_evolve.py, EMONAS-Net's SaMEA): worked examples of its rules, its operators, the
memory guard, a tiny end-to-end run, resume, parallel == sequential, and bad settings."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import write_cube_set

import engine
import genotypes
import parallel
import train_3D_continuation
import train_evolve
from evolution import candidate
from evolution import genes as eg
from evolution import samea as sm
from figures import search as search_figures
from model import NetworkLUNA
from utils import UserError

OPS3 = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3')
TINY = dict(DEVICE='cpu', SEARCH_FOLDS=(0, 1, 2, 3, 4), CUBE=8, EPOCHS=1, LAST_EPOCHS=1, PRIMITIVES=OPS3,
            FILTERS=(4,), CELLS=(2, 3), POPULATION=4, NEIGHBOURS=2, GENERATIONS=3, LEARNING_GENERATIONS=1)


def small_space(memory_gb=24.0):
    return eg.GeneSpace(OPS3, (4, 8), (2, 3), (0.01, 0.1), 8, 4, memory_gb)


# ---------------------------------------------------------------- worked examples of the rules

def test_pbi_worked_example():
    # F = (0.3, 0.4), w = (0.6, 0.4): d1 = F.w/|w| = 0.34/sqrt(0.52); d2 = sqrt(|F|^2 - d1^2); theta 0.5
    d1 = 0.34 / math.sqrt(0.52)
    expected = d1 + 0.5 * math.sqrt(0.25 - d1 ** 2)
    assert expected == pytest.approx(0.5547002, abs=1e-7)
    got = sm.pbi([[0.3, 0.4], [0.3, 0.4]], [[0.6, 0.4], [1.0, 0.0]], 0.5)
    assert got[0] == pytest.approx(expected) and got[1] == pytest.approx(0.3 + 0.5 * 0.4)


def test_fixed_normalization_bounds():
    # f1 over [0, worst f1 = 1.5], f2 over [ln 1e3, ln 1e6]: a point's normalized value depends on it alone
    lower, span = sm.normalizer(1.5, (math.log(1e3), math.log(1e6)))
    point = (np.array([0.75, math.log(1e4)]) - lower) / span
    assert point == pytest.approx([0.5, 1 / 3])
    space = small_space()
    low, high = space.f2_range()
    rng = np.random.default_rng(0)
    sizes = [math.log(space.params(space.random(rng))) for _ in range(20)]
    assert low < high and low <= min(sizes) and max(sizes) <= high  # every network of the space lies inside


def test_weight_vectors_and_neighbourhoods():
    w = sm.weight_vectors(10)
    assert w[:, 0] == pytest.approx(0.5 + 0.5 * np.arange(10) / 9) and w.sum(1) == pytest.approx(np.ones(10))
    hood = sm.neighbourhoods(w, 3)
    assert hood[0].tolist() == [0, 1, 2] and hood[5].tolist() == [5, 4, 6] and hood[9].tolist() == [9, 8, 7]


def test_mutation_rate_schedule():
    # EMONAS' 10 genes: start min(20/10, 1) = 1, floor 1/10: 0.81 at generation 1, 0.35 at 10, the floor from 27
    assert eg.mutation_rate(1, 40, 10) == pytest.approx(0.81, abs=0.005)
    assert eg.mutation_rate(10, 40, 10) == pytest.approx(0.35, abs=0.005)
    at_26 = 1 - math.log(27) / math.log(40)
    assert eg.mutation_rate(26, 40, 10) == pytest.approx(at_26) and at_26 > 0.1
    assert [eg.mutation_rate(g, 40, 10) for g in (27, 30, 35, 39)] == [0.1] * 4
    # our 27 genes: start 20/27, floor 1/27: at generation 1 about 16 of the 27 genes mutate, not 22
    assert eg.mutation_rate(1, 40, 27) == pytest.approx(20 / 27 * (1 - math.log(2) / math.log(40)))
    assert 27 * eg.mutation_rate(1, 40, 27) == pytest.approx(16.24, abs=0.01)
    assert eg.mutation_rate(39, 40, 27) == pytest.approx(1 / 27)
    assert eg.mutation_rate(1, 40, 5) == pytest.approx(1 - math.log(2) / math.log(40))  # short genome: start 1


def test_selection_probabilities_worked_examples():
    # counts [2, 0, 1, 1]: [0.5, 0, 0.25, 0.25] + 0.2/4, renormalized by 1.2
    assert sm.subproblem_probs([2, 0, 1, 1]) == pytest.approx([0.55 / 1.2, 0.05 / 1.2, 0.3 / 1.2, 0.3 / 1.2])
    assert sm.subproblem_probs([0, 0, 0]) == pytest.approx([1 / 3] * 3)
    assert sm.subproblem_probs([0, 0, 0], extra=0.0) == pytest.approx([1 / 3] * 3)  # EXPLORE=0, nothing credited
    assert sm.subproblem_probs([3, 1], extra=0.0) == pytest.approx([0.75, 0.25])
    # one gene with 3 values: value 0 seen with f1 0.2 and 0.4, value 1 with 0.6, value 2 unseen
    # with the fixed worst f1 0.6: scores [0.3, 0, 0]
    probs = sm.gene_value_probs([[0], [0], [1]], [0.2, 0.4, 0.6], [3], 0.6)
    assert probs[0] == pytest.approx([(1 + 0.2 / 3) / 1.2, (0.2 / 3) / 1.2, (0.2 / 3) / 1.2])
    # with the normalization's worst f1 1.5 (EMONAS' code), not the observed 0.6: scores [1.2, 0.9, 0]
    probs = sm.gene_value_probs([[0], [0], [1]], [0.2, 0.4, 0.6], [3], 1.5)
    assert probs[0] == pytest.approx([(1.2 / 2.1 + 0.2 / 3) / 1.2, (0.9 / 2.1 + 0.2 / 3) / 1.2, (0.2 / 3) / 1.2])


def test_prescreening_decisions():
    neighbours = np.array([[0.2, 0.5], [0.6, 0.1]])
    weights = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert sm.beats_a_neighbour([0.1, 0.5], neighbours, weights, 0.001)  # better error, same size: trained now
    assert not sm.beats_a_neighbour([0.9, 0.9], neighbours, weights, 0.001)  # worse on both: to the pool
    # pool: #1 is on the front of front + pool; of the rest, #0 has the lowest f1, then #2 the largest std
    chosen = sm.pool_choice([[0.5, 0.5], [0.05, 0.95], [0.9, 0.9]], [0.1, 0.05, 0.3], [[0.1, 0.6], [0.4, 0.2]])
    assert chosen == [0, 1, 2]
    # #1 and #2 are dominated by pool member #0 only (not by the front): not chosen as non-dominated; of the rest
    # {1, 2, 3}, #2 has the lowest f1; of {1, 3}, #3 the largest std; #1 stays untrained
    chosen = sm.pool_choice([[0.1, 0.1], [0.15, 0.15], [0.12, 0.9], [0.5, 0.5]], [0, 0, 0.1, 0.5], [[0.2, 0.2]])
    assert chosen == [0, 2, 3]


def test_front_best_set_and_hypervolume():
    F = np.array([[0.1, 3.0], [0.2, 2.0], [0.3, 2.5], [0.5, 1.0], [0.6, 4.0]])
    assert sm.front(F).tolist() == [0, 1, 3]
    assert sm.best_set(F, 3) == [0, 1, 3] and len(sm.best_set(F, 4)) == 4
    assert sm.hypervolume([[0.5, 0.5]], (1.0, 1.0)) == pytest.approx(0.25)


def test_surrogate_predicts_with_tree_spread():
    rng = np.random.default_rng(0)
    genomes = rng.integers(0, 3, (30, 5))
    y = genomes[:, 0] / 2.0
    mean, std = sm.Surrogate().fit(genomes, np.zeros(30), y).predict(genomes[:3], np.zeros(3))
    assert mean == pytest.approx(y[:3], abs=0.15) and (std >= 0).all()


# ---------------------------------------------------------------- genome, operators, memory guard

def test_decode_gives_a_valid_genotype_and_cost_matches_the_network():
    space = small_space()
    genome = space.random(np.random.default_rng(1))
    geno, C, cells, lr = space.decode(genome)
    for cell in (geno.normal, geno.reduce):
        for i in range(4):
            (_, a), (_, b) = cell[2 * i:2 * i + 2]
            assert 0 <= a < b <= i + 1
    model = NetworkLUNA(C, 2, cells, geno)
    n_params, gb = space.cost(genome)
    assert n_params == sum(p.numel() for p in model.parameters())
    count = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o.numel()))
             for part in (model.stem, model.cells) for m in part.modules() if not list(m.children())]
    model(torch.zeros(1, 1, 8, 8, 8))  # the pooled features and logits are not counted: a few numbers
    for h in hooks:
        h.remove()
    assert gb == pytest.approx(4 * (4 * count[0] + eg.OPTIMIZER_SLOTS * n_params) / 1e9)


def test_operators_give_valid_new_genomes_that_fit():
    space = small_space()
    rng = np.random.default_rng(0)
    costs = sorted(space.cost(space.random(rng))[1] for _ in range(8))
    space.memory_gb = costs[4]  # about half of the genomes are too large now
    init = eg.latin_hypercube(space, 4, rng)
    assert len(set(init)) == 4 and all(space.fits(g) for g in init)
    seen = set(init)
    for k in range(10):
        rate = eg.mutation_rate(1 + k % 3, 3, len(space))
        probs = eg.uniform_value_probs(space) if k % 2 else sm.gene_value_probs(list(seen), range(len(seen)),
                                                                                 space.sizes, len(seen))
        child = eg.make_child(space, [init[k % 4], init[(k + 1) % 4]], rate, probs, seen, rng)
        space.decode(child)
        assert child not in seen and space.fits(child)
        seen.add(child)


def test_latin_hypercube_spreads_each_gene():
    space = eg.GeneSpace(OPS3, (4, 5, 6, 7), (2,), (0.1,), 8, 4, 24.0)
    init = eg.latin_hypercube(space, 4, np.random.default_rng(3))
    assert sorted(g[-3] for g in init) == [0, 1, 2, 3]  # 4 samples of a 4-value gene: each value once


def test_diverged_candidate_gets_the_worst_f1(tmp_path, monkeypatch):
    cubes = write_cube_set(tmp_path / 'cubes', size=8)
    cfg = {**train_evolve.DEFAULTS, **TINY, 'DATA': cubes}
    genome = candidate.gene_space(cfg).random(np.random.default_rng(0))
    monkeypatch.setattr(engine, 'train_step', lambda *a: (torch.tensor(float('nan')), torch.tensor(0)))
    result = candidate.train_candidate(cfg, 0, genome, str(tmp_path / 'c.json'))
    assert result['diverged'] and result['f1'] == candidate.worst_f1(cfg['ALPHA'], cfg['BETA'])
    assert json.load(open(tmp_path / 'c.json'))['f1'] == result['f1']


def test_objective_f1_worked_example():
    # alpha 0.25 (1 - mean(0.8, 0.9)) + (1 - mean(0.6, 0.7)) + beta 0.25 (10 - 2) / 10; best loss at epoch 2
    f1, e_best = candidate.objective_f1([0.5, 0.8, 0.9], [0.5, 0.6, 0.7], [0.9, 0.5, 0.6], 10, 0.25, 0.25, 2)
    assert e_best == 2 and f1 == pytest.approx(0.25 * 0.15 + 0.35 + 0.25 * 0.8)


# ---------------------------------------------------------------- the search loop

def fake_candidate(cfg, idx, genome, path):
    """A deterministic stand-in for training: f1 from the genome, the real parameter count."""
    params = candidate.gene_space(cfg).params(genome)
    f1 = (sum((i + 1) * v for i, v in enumerate(genome)) % 17) / 17
    return {'index': idx, 'genome': list(genome), 'params': params, 'f1': f1, 'f2': math.log(params), 'e_best': 1,
            'epochs': 1, 'diverged': False, 'm_train': 1 - f1, 'm_val': 1 - f1, 'val_loss': f1, 'acc_val': 0.0,
            'auc_val': 0.0, 'seconds': 0.0}


def reversed_map_jobs(fn, jobs, mode='off', names=None, log=print, gpus=None):
    """A stand-in for a parallel backend: jobs run in reverse order, results returned in job order."""
    if mode == 'off':
        return [fn(*args) for args in jobs]
    return [fn(*args) for args in jobs[::-1]][::-1]


def read_rows(path, drop=('seconds',)):
    with open(path, newline='') as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


# ---------------------------------------------------------------- the loop's decisions, worked examples

class StubRun:
    """What Search needs of a run folder: files under `path` and a log kept as a list."""

    def __init__(self, path):
        self.path, self.lines = str(path), []

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, line):
        self.lines.append(line)


class NoOutputs:
    def evaluated(self, archive):
        pass


def stub_search(tmp_path, monkeypatch, **settings):
    """A Search of TINY's space whose candidates are fake_candidate (nothing is trained)."""
    monkeypatch.setattr(train_evolve, 'train_candidate', fake_candidate)
    os.makedirs(tmp_path / 'candidates', exist_ok=True)
    cfg = {**train_evolve.DEFAULTS, **TINY, 'DATA': str(tmp_path), **settings}
    return train_evolve.Search(cfg, StubRun(tmp_path), NoOutputs())


# normalized points of the current members of subproblems 0..3 (weights w1 = 0.5, 2/3, 5/6, 1), kept in the archive
# in another order than their subproblems' (population = [3, 2, 1, 0]), so an archive index is no subproblem index
MEMBERS = {0: (0.1, 0.9), 1: (0.2, 0.5), 2: (0.5, 0.1), 3: (0.9, 0.9)}


def hand_made(search, children=()):
    """Archive rows 0..3 = the members of subproblems 3, 2, 1, 0; then the children (point, subproblem); the
    normalization made the identity so that the points are the normalized points."""
    search.archive = [{'f1': MEMBERS[s][0], 'f2': MEMBERS[s][1], 'genome': (s,), 'params': 1000,
                       'subproblem': ''} for s in (3, 2, 1, 0)]
    search.archive += [{'f1': p[0], 'f2': p[1], 'genome': (9, k), 'params': 1000, 'subproblem': s}
                       for k, (p, s) in enumerate(children)]
    search.population = [3, 2, 1, 0]
    search.lower, search.span = np.zeros(2), np.ones(2)
    return search


def test_replacement_worked_example():
    w = sm.weight_vectors(4)
    assert sm.neighbourhoods(w, 2)[2].tolist() == [2, 1]  # equally near 1 and 3: the lower index
    # child c = (0.3, 0.6) against the members of subproblems 2 (a = (0.5, 0.1)) and 1 (b = (0.2, 0.5)), each under
    # its own weight vector (theta 0: PBI = F.w / |w|): w2 = (5/6, 1/6): c 0.35 <= a 0.433, replaced;
    # w1 = (2/3, 1/3): c 0.4 > b 0.3, kept
    assert sm.replaced((0.3, 0.6), [(0.5, 0.1), (0.2, 0.5)], w[[2, 1]], 0.0) == [0]
    # a judged under w1 (0.367 < c's 0.4) would be kept: the neighbour's own vector decides
    assert sm.replaced((0.3, 0.6), [(0.5, 0.1)], w[[1]], 0.0) == []
    assert sm.replaced((0.3, 0.6), [(0.3, 0.6)], w[[1]], 0.001) == [0]  # equal PBI: the child replaces (>=)
    assert sm.replaced((0.9, 0.9), [(0.5, 0.1), (0.2, 0.5)], w[[2, 1]], 0.001) == []  # worse: replaces no one


def test_search_replaces_the_right_neighbour_and_keeps_the_better(tmp_path, monkeypatch):
    search = hand_made(stub_search(tmp_path, monkeypatch),
                       children=[((0.3, 0.6), 2), ((0.95, 0.95), 1), ((0.3, 0.25), 2)])
    search.replace_neighbours(2, 4)
    # subproblem 2's member (archive 1) is replaced by child 4; subproblem 1's (archive 2) is better than it: kept
    assert search.population == [3, 2, 4, 0]
    search.replace_neighbours(1, 5)  # a child worse than both neighbours (subproblems 1 and 0) replaces nobody
    assert search.population == [3, 2, 4, 0]
    # and a worse member is never put back over a better child: child 4 as a neighbour stays
    search.replace_neighbours(2, 5)
    assert search.population == [3, 2, 4, 0]
    # child 6 = (0.3, 0.25) of subproblem 2 replaces both neighbours, each judged under its own vector: under w2
    # 0.29 against child 4's 0.35; under w1 0.283 against b's 0.3 (under w2, b's 0.25 would have kept b)
    search.replace_neighbours(2, 6)
    assert search.population == [3, 6, 6, 0]


def test_prescreening_against_the_neighbourhood(tmp_path, monkeypatch):
    search = hand_made(stub_search(tmp_path, monkeypatch))
    assert search.screen(2, (0.3, 0.6))  # would replace subproblem 2's member (see the replacement example)
    # (0.6, 0.6): PBI 0.6 under w2 against a's 0.433, 0.6 under w1 against b's 0.3: beats no neighbour, to the pool;
    # it would beat subproblem 3's member (0.9, 0.9) under w3 = (1, 0), but 3 is no neighbour of 2
    assert not search.screen(2, (0.6, 0.6))
    assert search.screen(3, (0.6, 0.6))  # ... and is one of 3 (neighbours 3, 2)
    # (0.45, 0.2) beats one neighbour of 2 only: a under w2 (0.408 <= 0.433), not b under w1 (0.367 > 0.3)
    assert search.screen(2, (0.45, 0.2))


def test_success_credit_worked_example(tmp_path, monkeypatch):
    # archive 0..3 as hand_made, children 4 = (0.15, 0.45) bred by subproblem 2 and 5 = (0.95, 0.95) by 0.
    # Fronts: {1, 3, 4}, then {2} (dominated by 4), {0}, {5}: the best 4 are {1, 2, 3, 4}; child 4 entered, 5 not
    F = [(0.9, 0.9), (0.5, 0.1), (0.2, 0.5), (0.1, 0.9), (0.15, 0.45), (0.95, 0.95)]
    best = sm.best_set(F, 4)
    assert best == [1, 2, 3, 4]
    assert sm.credit([1, 0, 0, 0], [4, 5], best, {4: 2, 5: 0}).tolist() == [1, 0, 1, 0]
    search = hand_made(stub_search(tmp_path, monkeypatch), children=[((0.15, 0.45), 2), ((0.95, 0.95), 0)])
    search.counts = np.array([1.0, 0, 0, 0])
    search.end_generation(1, [4, 5])
    assert search.counts.tolist() == [1, 0, 1, 0]  # the breeding subproblem of the child that entered, only
    search.end_generation(2, [])
    assert search.counts.tolist() == [1, 0, 1, 0]  # cumulative; no children, no credit


def test_initial_population_is_ordered_onto_the_weight_vectors(tmp_path, monkeypatch):
    # f1: rows 0 and 2 tie at 0.5 (row 2 the smaller network), row 1 lowest, row 3 highest
    F = [(0.5, 10.0), (0.2, 12.0), (0.5, 8.0), (0.9, 9.0)]
    assert sm.initial_order(F) == [3, 2, 0, 1]  # subproblem 3 (w = (1, 0)) gets the lowest f1
    search = stub_search(tmp_path, monkeypatch)
    search.initialize()
    f1 = [search.archive[i]['f1'] for i in search.population]
    assert sorted(search.population) == [0, 1, 2, 3] and f1 == sorted(f1, reverse=True) and len(set(f1)) > 1
    assert search.population != [0, 1, 2, 3]  # (fake_candidate's f1 of this sample is not already in that order)
    assert any(line.startswith('initial population onto the weight vectors') for line in search.run.lines)


def test_exploitation_subproblems_follow_their_success_probabilities():
    # counts [3, 1, 0, 0], extra 0.2: p = ([0.75, 0.25, 0, 0] + 0.05) / 1.2
    want = np.array([0.8, 0.3, 0.05, 0.05]) / 1.2
    draws = sm.draw_subproblems([3, 1, 0, 0], 6000, 0.2, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / 6000
    assert np.abs(freq - want).max() < 0.02  # binomial std at most 0.0065
    assert sm.draw_subproblems([0, 0, 5, 0], 50, 0.0, np.random.default_rng(1)) == [2] * 50


def test_exploitation_generation_uses_the_probabilities_and_the_fixed_worst(tmp_path, monkeypatch):
    search = stub_search(tmp_path, monkeypatch, EXPLORE=0.0)
    search.initialize()
    search.counts = np.array([0.0, 0, 5, 0])  # only subproblem 2 ever succeeded: with EXPLORE 0 it breeds them all
    seen = {}
    gene_value_probs, mutation_rate = sm.gene_value_probs, eg.mutation_rate

    def spy_values(genomes, f1, sizes, f1_worst, extra):
        seen['worst'] = f1_worst
        return gene_value_probs(genomes, f1, sizes, f1_worst, extra)

    def spy_rate(g, generations, n_genes):
        seen['n_genes'] = n_genes
        return mutation_rate(g, generations, n_genes)
    monkeypatch.setattr(sm, 'gene_value_probs', spy_values)
    monkeypatch.setattr(eg, 'mutation_rate', spy_rate)
    done = search.exploitation_generation(2)
    assert done and {search.archive[i]['subproblem'] for i in done} == {2}
    assert seen == {'worst': 1.5, 'n_genes': 27} and len(search.space) == 27  # 1 + ALPHA + BETA; the genome's length


def test_surrogate_inputs_and_target(tmp_path, monkeypatch):
    calls = []

    class Spy:
        def __init__(self, seed=0):
            pass

        def fit(self, genomes, f2, target):
            calls.append((genomes, np.asarray(f2), np.asarray(target)))
            return self

        def predict(self, genomes, f2):
            return np.full(len(genomes), 0.4), np.full(len(genomes), 0.1)
    search = stub_search(tmp_path, monkeypatch)
    search.initialize()
    monkeypatch.setattr(sm, 'Surrogate', Spy)
    new = [search.space.random(np.random.default_rng(k)) for k in range(2)]
    point, std, f1_pred = search.surrogate_predict(new)
    genomes, f2, target = calls[0]
    # every evaluated genome; features: its genes + ln(parameters) (raw); target: f1 / the fixed worst f1 (1.5)
    assert [tuple(g) for g in genomes] == [r['genome'] for r in search.archive]
    assert f2 == pytest.approx([math.log(r['params']) for r in search.archive])
    assert target == pytest.approx([r['f1'] / 1.5 for r in search.archive])
    lower, span = search.lower, search.span
    assert point[:, 0] == pytest.approx([0.4, 0.4]) and f1_pred == pytest.approx([0.6, 0.6])
    assert std.tolist() == [0.1, 0.1]
    assert point[:, 1] == pytest.approx([(math.log(search.space.params(g)) - lower[1]) / span[1] for g in new])


def test_each_candidates_training_seed_depends_on_its_index(tmp_path, monkeypatch):
    seeds = []

    def fake_fit(cfg, model, lr, seed, name, run_path):
        seeds.append((seed, torch.initial_seed()))
        return {'m_train': [0.5], 'm_val': [0.5], 'val_loss': [0.7], 'acc_val': [50.0], 'auc_val': [50.0],
                'malignant_val': [0.5]}, False
    monkeypatch.setattr(candidate, 'fit', fake_fit)
    cfg = {**train_evolve.DEFAULTS, **TINY, 'SEED': 3}
    genome = candidate.gene_space(cfg).random(np.random.default_rng(0))
    for idx in (4, 5, 4):
        candidate.train_candidate(cfg, idx, genome, str(tmp_path / f'{len(seeds)}.json'))
    assert seeds[0] == seeds[2] != seeds[1]  # the same genome as candidate 4 and 5 trains from other seeds
    assert [s for s, _ in seeds] == [candidate.candidate_seed(3, i) for i in (4, 5, 4)]
    assert all(s == t for s, t in seeds)  # torch is seeded with it before the network is built
    assert candidate.candidate_seed(3, 4) != candidate.candidate_seed(4, 4)


def test_parallel_equals_sequential_and_screening_follows_the_surrogate(tmp_path, monkeypatch):
    monkeypatch.setattr(train_evolve, 'train_candidate', fake_candidate)
    monkeypatch.setattr(parallel, 'map_jobs', reversed_map_jobs)
    monkeypatch.setattr(search_figures, 'plot_pareto', lambda *a, **k: None)  # drawn in the end-to-end test; slow here
    cubes = write_cube_set(tmp_path / 'cubes', n_folds=5, size=8)  # checked before the run; never trained on here
    settings = dict(TINY, DATA=cubes, POPULATION=4, GENERATIONS=4, LEARNING_GENERATIONS=1)
    seq = train_evolve.main(**settings, RUNS=str(tmp_path / 'a'), PARALLEL='off')
    par = train_evolve.main(**settings, RUNS=str(tmp_path / 'b'), PARALLEL='ray')
    rows = read_rows(os.path.join(seq['run'], 'evaluations.csv'))
    assert rows == read_rows(os.path.join(par['run'], 'evaluations.csv'))
    assert [r['phase'] for r in rows[:8]] == ['init'] * 4 + ['learning'] * 4
    exploit = [r for r in rows if r['phase'] == 'exploitation']
    assert exploit and all(r['predicted_f1'] and r['screening'] in ('beats a neighbour', 'pool') for r in exploit)
    assert all(1 <= sum(r['generation'] == str(g) for r in exploit) <= 4 for g in (2, 3))
    # a surrogate that predicts far better errors than any seen: every child is trained at once
    settings['GENERATIONS'] = 3
    monkeypatch.setattr(sm.Surrogate, 'predict', lambda self, g, f2: (np.full(len(g), -10.0), np.zeros(len(g))))
    best = train_evolve.main(**settings, RUNS=str(tmp_path / 'c'))
    exploit = [r for r in read_rows(os.path.join(best['run'], 'evaluations.csv')) if r['phase'] == 'exploitation']
    assert len(exploit) == 4 and {r['screening'] for r in exploit} == {'beats a neighbour'}
    # ... one that predicts the worst error: all wait in the pool; the lowest and most uncertain are among those trained
    monkeypatch.setattr(sm.Surrogate, 'predict', lambda self, g, f2: (np.full(len(g), 5.0), np.arange(len(g)) / 10))
    worst = train_evolve.main(**settings, RUNS=str(tmp_path / 'd'))
    exploit = [r for r in read_rows(os.path.join(worst['run'], 'evaluations.csv')) if r['phase'] == 'exploitation']
    # all predictions equal, so none is dominated by another... but the front's points dominate them: the lowest
    # (the first) and the most uncertain (the last) child are trained
    assert [r['screening'] for r in exploit] == ['pool', 'pool']
    assert [float(r['predicted_std']) for r in exploit] == [0.0, 0.3]


def test_bad_settings_are_one_line_errors_before_anything_is_written(tmp_path):
    runs = tmp_path / 'runs'
    cubes = write_cube_set(tmp_path / 'cubes', n_folds=5, size=8, nodules_per_scan=1)  # labels alternate by scan
    for bad, match in (({'POPULATION': 2, 'NEIGHBOURS': 3}, 'NEIGHBOURS=3'),
                       ({'FILTERS': ()}, r'FILTERS=\(\) is not allowed'),
                       ({'METRIC': 'f1'}, 'METRIC'), ({'GENERATIONS': 1}, 'GENERATIONS'),
                       ({'PARALLEL': 'mpi'}, 'PARALLEL'), ({'CUBE': 10}, 'CUBE=10'),
                       ({'EXPLORE': -0.1}, 'EXPLORE=-0.1 is not allowed'),
                       ({'VAL_FRACTION': 0.01}, 'cannot split 10 scans'),
                       ({'METRIC': 'auc', 'SEARCH_FOLDS': (0,)}, "METRIC='auc': search-train .* holds one class")):
        with pytest.raises(UserError, match=match):
            train_evolve.main(**{**TINY, 'DATA': cubes, **bad}, RUNS=str(runs))
    assert not runs.exists()


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('evolve')
    cubes = write_cube_set(root / 'cubes', size=8)
    return cubes, root, train_evolve.main(**TINY, DATA=cubes, RUNS=str(root / 'runs'))


def test_tiny_search_writes_all_outputs_and_a_member_retrains(tiny_run):
    cubes, root, out = tiny_run
    run = out['run']
    for name in ('config.json', 'log.txt', 'evaluations.csv', 'pareto.csv', 'pareto.png'):
        assert os.path.getsize(os.path.join(run, name)) > 0
    rows = read_rows(os.path.join(run, 'evaluations.csv'), drop=())
    assert [int(r['index']) for r in rows] == list(range(out['evaluated'])) and out['evaluated'] >= 9
    assert all(float(r['f2']) == pytest.approx(math.log(int(r['params']))) for r in rows)
    front = read_rows(os.path.join(run, 'pareto.csv'), drop=())
    assert len(front) == len(out['front']) == len(os.listdir(os.path.join(run, 'front')))
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'generation  2 of 2:' in log and 'hypervolume' in log
    member = front[0]
    result = train_3D_continuation.main(DATA=cubes, RUNS=str(root / 'retrain'), GENOTYPE=member['genotype_file'],
                                        DEVICE='cpu', FOLD=5, TRAIN_FOLDS=(0, 1), CUBE=8, EPOCHS=1, LAYERS=2)
    config = json.load(open(os.path.join(result['run'], 'config.json')))
    assert (config['C'], config['LR'], config['LAYERS']) == (int(member['C']), float(member['lr']), 2)


def test_resume_after_a_kill_equals_the_uninterrupted_run(tiny_run, monkeypatch):
    cubes, root, full = tiny_run

    def killed_at_9(cfg, idx, genome, path):  # candidate 9: in the exploitation phase (generation 2)
        if idx == 9:
            raise KeyboardInterrupt
        return candidate.train_candidate(cfg, idx, genome, path)
    monkeypatch.setattr(train_evolve, 'train_candidate', killed_at_9)
    with pytest.raises(KeyboardInterrupt):
        train_evolve.main(**TINY, DATA=cubes, RUNS=str(root / 'killed'))
    run = os.path.join(root / 'killed', os.listdir(root / 'killed')[0])
    assert len(os.listdir(os.path.join(run, 'candidates'))) == 9
    monkeypatch.undo()
    resumed = train_evolve.main(RESUME=run)
    assert resumed['evaluated'] == full['evaluated']
    assert read_rows(os.path.join(run, 'evaluations.csv')) == read_rows(os.path.join(full['run'], 'evaluations.csv'))
    assert (read_rows(os.path.join(run, 'pareto.csv'), drop=('genotype_file',))
            == read_rows(os.path.join(full['run'], 'pareto.csv'), drop=('genotype_file',)))


def test_pareto_plot_reads_evaluations_and_rejects_a_bad_file(tmp_path):
    path = tmp_path / 'evaluations.csv'
    path.write_text('index,generation,params,f1\n0,0,1000,0.5\n1,1,2000,0.3\n2,1,3000,0.4\n')
    png = search_figures.plot_pareto(str(path), str(tmp_path / 'p.png'), 12.79e6, run='t')
    assert os.path.getsize(png) > 0
    path.write_text('index,generation,f1\n0,0,0.5\n')
    with pytest.raises(UserError, match='params'):
        search_figures.plot_pareto(str(path), str(tmp_path / 'q.png'))


def test_budget_estimate_is_anchored_on_the_measured_paper_step():
    # the paper network at the measured setting gets the measured step; half the batch about half of it (memory-bound
    # scaling), never below the host floor; the search estimate multiplies it out
    ref_params, ref_gb = eg.network_cost(genotypes.NAS_HBO_PAPER, 36, 20, 32, 4)
    ref = ref_gb * 1e9 / 4 - eg.OPTIMIZER_SLOTS * ref_params
    assert eg.step_seconds_estimate(genotypes.NAS_HBO_PAPER, 36, 20, 32, 4, ref) == pytest.approx(eg.REF_STEP_S)
    half = eg.step_seconds_estimate(genotypes.NAS_HBO_PAPER, 36, 20, 32, 2, ref)
    assert 0.45 * eg.REF_STEP_S < half < 0.55 * eg.REF_STEP_S
    tiny = eg.step_seconds_estimate(genotypes.NAS_HBO_PAPER, 4, 3, 8, 1, ref)
    assert tiny == pytest.approx(3 * eg.OPS_PER_CELL * eg.LAUNCH_S)
    space = small_space()
    hours, step = eg.search_hours_estimate(space, 40, 20, 2, 10, 3, np.random.default_rng(0))
    per_epoch = step * (math.ceil(40 / space.batch) + 60 / space.batch / 3)
    assert hours == pytest.approx(10 * 2 * per_epoch / 3600)


def test_log_says_how_many_candidates_how_long_and_how_far(tiny_run):
    cubes, root, out = tiny_run
    log = open(os.path.join(out['run'], 'log.txt')).read().splitlines()
    # 4 at initialization and in the 1 learning generation, then 1 to 4 in the 1 exploitation generation
    plan = [line for line in log if line.startswith('9 to 12 candidates: 4 at initialization and in each of 1 ')]
    assert len(plan) == 1 and log.index(plan[0]) < next(i for i, x in enumerate(log) if x.startswith('  candidate 0 '))
    first = next(x for x in log if x.startswith('  the first candidate took '))
    assert ': 9 to 12 candidates take roughly ' in first
    done = next(x for x in log if x.startswith('generation  1 of 2: 4 trained, 8 in all '))
    assert '8 in all (67% to 89% of the 9 to 12 candidates)' in done  # 8/12, 8/9
    last = next(x for x in log if x.startswith('generation  2 of 2: '))
    assert f'{out["evaluated"]} in all (100% of the {out["evaluated"]} candidates)' in last
    rows = read_rows(os.path.join(out['run'], 'evaluations.csv'), drop=())
    line = next(x for x in log if x.startswith('  candidate 0 '))
    assert f', search-val acc {100 * float(rows[0]["m_val"]):.1f}%, ' in line  # percent, as every other log


def test_constant_predictors_are_named_in_the_log(tiny_run):
    cubes, root, out = tiny_run
    run = out['run']
    rows = read_rows(os.path.join(run, 'evaluations.csv'), drop=())
    log = open(os.path.join(run, 'log.txt')).read()
    val = candidate.search_data({**train_evolve.DEFAULTS, **TINY, 'DATA': cubes})[1]
    benign_share = 100 * float((val.labels == 0).float().mean())
    constant = 0
    for r in rows:
        share = float(r['malignant_val'])
        line = f'candidate {r["index"]} predicts one class only: every search-val nodule '
        assert (line in log) == (share in (0.0, 1.0)), r['index']
        if share in (0.0, 1.0):  # its accuracy is the share of the class it always says (LAST_EPOCHS = 1)
            constant += 1
            assert float(r['acc_val']) == pytest.approx(benign_share if share == 0 else 100 - benign_share, abs=1e-3)
            assert line + ('benign' if share == 0 else 'malignant') in log
    assert constant > 0  # (8^3 cubes, 1 epoch: the tiny run has constant predictors, so the rule above was exercised)


def test_constant_prediction_rule():
    assert candidate_row(0.0) == 'benign' and candidate_row(1.0) == 'malignant'
    assert candidate_row(0.5) == '' and candidate_row(float('nan')) == ''
    assert candidate_row(0.0, diverged=True) == ''


def candidate_row(share, diverged=False):
    from evolution import records
    return records.constant_prediction({'malignant_val': share, 'diverged': diverged})


def test_a_run_of_the_older_search_is_refused_with_one_line(tiny_run, tmp_path):
    _, _, out = tiny_run
    old = tmp_path / 'old'
    os.makedirs(old)
    config = json.load(open(os.path.join(out['run'], 'config.json')))
    json.dump({**config, 'MUTATION_FLOOR': 0.1}, open(old / 'config.json', 'w'))
    with pytest.raises(UserError, match=r'written by an earlier version of this search .* start a new run'):
        train_evolve.main(RESUME=str(old))
    assert os.listdir(old) == ['config.json']  # nothing written


def test_share_predicted_malignant_on_search_val(tmp_path, monkeypatch):
    cubes = write_cube_set(tmp_path / 'cubes', size=8)
    cfg = {**train_evolve.DEFAULTS, **TINY, 'DATA': cubes, 'EPOCHS': 2, 'LAST_EPOCHS': 2}
    evaluate = engine.evaluate

    def every_fourth_at_one_half(model, data, batch_size, *args):
        out = evaluate(model, data, batch_size, *args)
        return {**out, 'prob': np.where(np.arange(len(out['prob'])) % 4 == 0, 0.5, 0.49)}  # 0.5 counts malignant
    monkeypatch.setattr(engine, 'evaluate', every_fourth_at_one_half)
    genome = candidate.gene_space(cfg).random(np.random.default_rng(0))
    result = candidate.train_candidate(cfg, 0, genome, str(tmp_path / 'c.json'))
    n_val = len(candidate.search_data(cfg)[1])
    assert result['malignant_val'] == pytest.approx(math.ceil(n_val / 4) / n_val) and n_val > 4
