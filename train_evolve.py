"""Multi-objective evolutionary architecture search (EMONAS-Net's SaMEA) of the same cell space on the search folds:
networks that are accurate (f1) and small (f2 = ln parameters).

python train_evolve.py [config.py] [--NAME=value ...]
Phases: 0 Latin-hypercube initialization; 1..LEARNING_GENERATIONS learning (MOEA/D with PBI, uniform crossover,
decaying mutation; every child trained); then exploitation (subproblems and gene values drawn by their learned
selection probabilities, a random-forest surrogate decides which children are trained). docs/evolve.md.
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import json
import os
import shutil

import numpy as np

import data
import engine
import operations
import parallel
import runfolder
import settings
import tboard
import utils
from evolution import genes as eg
from evolution import samea as sm
from evolution.candidate import RESULT_NAME, check_candidates, gene_space, primitives_of, train_candidate, worst_f1
from evolution.records import Outputs

DATA = data.DEMO_DIR  # cube set folder (nodules.csv + cubes/); the demo set is built there on first use
SEARCH_FOLDS = (0, 1, 2, 3, 4)  # the only folds the search reads (the test folds are never touched)
VAL_FRACTION = 0.5  # share of the search folds' scans used as search-val
CUBE = 24  # candidate input edge in voxels, centre crop (retrain: 32); fidelity chosen for the budget (docs/evolve.md)
EPOCHS = 5  # maximum epochs per candidate, E of f1 (EMONAS: 120; fidelity chosen for the budget, docs/evolve.md)
PATIENCE = 2  # stop a candidate when search-val loss has not improved for this many epochs (EMONAS: 20; 0: off)
LAST_EPOCHS = 2  # f1 averages the metrics over the last this many epochs run (EMONAS: 5)
BATCH_SIZE = 4  # cubes per step (the retrain's batch)
ONE_SIDED_SHIFT = False  # random crop: content moves 0..+2 voxels per axis before the flip (the published code pads the
# low side only); False: -2..+2
MOMENTUM = 0.9  # SGD momentum (the retrain's optimizer, so a member's learning rate carries over)
WEIGHT_DECAY = 3e-4  # SGD weight decay
GRAD_CLIP = 5.0  # max gradient norm
PRIMITIVES = 'mrfc'  # candidate ops of the cells: 'mrfc' (the paper's 9) or a tuple of op names
FILTERS = (8, 16, 32)  # initial channels C (EMONAS: 8, 16, 32)
CELLS = (5, 7, 9)  # numbers of cells (EMONAS: 5, 7, 9)
REDUCE_SHIFT = False  # FactorizedReduce's 2nd 1x1x1 stride-2 conv reads x one voxel on (DARTS); False: both read the
# same voxels (the published NAS-HBO code)
LRS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07,
       0.08, 0.09, 0.1)  # EMONAS' 19 Adam rates x100, SGD
POPULATION = 10  # subproblems = population (EMONAS: 10)
GENERATIONS = 40  # generations, 0 = initialization (EMONAS: 40)
LEARNING_GENERATIONS = 10  # generations 1..this are the learning phase, the rest exploitation (EMONAS: 10)
NEIGHBOURS = 3  # neighbourhood size, itself included (EMONAS: 3)
THETA = 0.001  # PBI penalty (EMONAS: 0.001)
ALPHA = 0.25  # weight of the search-train error in f1 (EMONAS: 0.25)
BETA = 0.25  # weight of the early-best-epoch term in f1 (EMONAS: 0.25)
METRIC = 'acc'  # classification metric of f1: 'acc' or 'auc'
EXPLORE = 0.2  # added mass of the selection probabilities, spread over subproblems / a gene's values (EMONAS: 0.2)
MEMORY_GB = 24.0  # memory guard: a genome's estimated training-step memory must stay below this (GB)
SEED = 2  # seed of the algorithm's generator and, with the candidate index, of each candidate's training
DEVICE = settings.default_device()  # 'cuda' or 'cpu'
PARALLEL = 'off'  # independent candidates through parallel.map_jobs: 'off' (one after the other) or 'ray'
RUNS = 'runs'  # folder of run folders
TAG = ''  # suffix of the run folder name
TENSORBOARD = tboard.installed()  # TensorBoard event files in the run folder (tensorboard --logdir runs), if installed
RESUME = ''  # a run folder of this script: finished candidates are read back, the search continues
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules: '>= 1' reads 'EPOCHS >= 1';
    # None: any value of the setting's type; PRIMITIVES and the cube set are checked by check_inputs())
    'DATA': None, 'SEARCH_FOLDS': 'folds(SEARCH_FOLDS)', 'VAL_FRACTION': '0 < VAL_FRACTION < 1',
    'CUBE': 'CUBE >= 8 and CUBE % 4 == 0', 'EPOCHS': '>= 1', 'PATIENCE': '>= 0', 'LAST_EPOCHS': '>= 1',
    'BATCH_SIZE': '>= 1', 'ONE_SIDED_SHIFT': None,
    'MOMENTUM': '0 <= MOMENTUM < 1', 'WEIGHT_DECAY': '>= 0', 'GRAD_CLIP': '> 0',
    'PRIMITIVES': None, 'FILTERS': 'len(FILTERS) >= 1 and ints(FILTERS) and min(FILTERS) >= 1',
    'CELLS': 'len(CELLS) >= 1 and ints(CELLS) and min(CELLS) >= 1', 'REDUCE_SHIFT': None,
    'LRS': 'len(LRS) >= 1 and min(LRS) > 0',
    'POPULATION': '>= 2', 'GENERATIONS': '>= 2', 'LEARNING_GENERATIONS': '0 <= LEARNING_GENERATIONS < GENERATIONS',
    'NEIGHBOURS': '2 <= NEIGHBOURS <= POPULATION', 'THETA': '>= 0', 'ALPHA': '>= 0', 'BETA': '>= 0',
    'METRIC': "in ('acc', 'auc')", 'EXPLORE': '>= 0',
    'MEMORY_GB': '> 0', 'SEED': '>= 0', 'DEVICE': 'device(DEVICE)', 'PARALLEL': "in ('off', 'ray')",
    'RUNS': "!= ''", 'TAG': None, 'TENSORBOARD': 'tensorboard(TENSORBOARD)', 'RESUME': None,
}


def check_inputs(cfg):
    """The candidate ops and the cube set, checked before anything is written (the settings' ranges: RULES)."""
    prims = primitives_of(cfg)
    for name in prims:
        operations.check_op_name(name)
    data.check_cube_size(cfg['CUBE'], prims)
    table = data.select_folds(data.read_table(cfg['DATA']), cfg['SEARCH_FOLDS'], cfg['DATA'], 'SEARCH_FOLDS')
    for name, idx in zip(('search-train', 'search-val'), data.split_by_scan(table, cfg['VAL_FRACTION'], cfg['SEED'])):
        if cfg['METRIC'] == 'auc' and table['label'].iloc[idx].nunique() < 2:
            raise utils.UserError(f"METRIC='auc': {name} ({len(idx)} nodules) holds one class only; its AUC is "
                                  "undefined: use more SEARCH_FOLDS, another VAL_FRACTION or METRIC='acc'")
    parallel.check_mode(cfg['PARALLEL'])  # Ray missing: one line now, not after the run folder is made


def planned_candidates(cfg, after=-1):
    """(fewest, most) candidates the search trains after generation `after` (-1: all of them): POPULATION at
    initialization (generation 0) and in each learning generation, then per exploitation generation 1 to POPULATION
    (those the surrogate predicts to beat a neighbour, and a few from the pool)."""
    learning = max(0, cfg['LEARNING_GENERATIONS'] - max(after, 0)) + (after < 0)  # initialization counted as one
    exploit = cfg['GENERATIONS'] - 1 - max(after, cfg['LEARNING_GENERATIONS'])
    fixed = cfg['POPULATION'] * learning
    return fixed + exploit, fixed + exploit * cfg['POPULATION']


def refuse_older_run(run_path):
    """A run folder of the search before its MUTATION_FLOOR setting went (issue 20: the published mutation rate, gene
    score and initial order) cannot be replayed by this code: one line saying so, before anything is written."""
    path = os.path.join(run_path, 'config.json')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # missing or damaged: settings.resolve names it
        return
    if isinstance(saved, dict) and 'MUTATION_FLOOR' in saved:
        raise utils.UserError(f'RESUME={run_path}: written by an earlier version of this search (fixed mutation '
                              'constants, gene scores from the observed worst f1, an unordered initial population); '
                              'this one would take other decisions, so it cannot continue it: start a new run (the '
                              "folder's candidates/ and pareto.csv stay valid as results)")


class Search:
    """SaMEA's state: every evaluated candidate (archive), the population (an archive index per subproblem), the
    subproblems' success counts, and the one seeded generator all of the algorithm's random choices come from."""

    def __init__(self, cfg, run, outputs):
        self.cfg, self.run, self.out = cfg, run, outputs
        self.space = gene_space(cfg)
        self.rng = np.random.default_rng(cfg['SEED'])
        self.weights = sm.weight_vectors(cfg['POPULATION'])
        self.hood = sm.neighbourhoods(self.weights, cfg['NEIGHBOURS'])
        self.archive, self.population = [], []
        self.counts = np.zeros(cfg['POPULATION'])
        self.job_cfg = {**cfg, 'DATA': os.path.abspath(cfg['DATA'])}  # workers may run in another folder
        self.lower, self.span = sm.normalizer(worst_f1(cfg['ALPHA'], cfg['BETA']), self.space.f2_range())
        self.board = tboard.Board(run.path, cfg['TENSORBOARD'])  # a replayed search writes its stream anew

    def F(self, idx=None):
        F = np.array([[r['f1'], r['f2']] for r in self.archive])
        return F if idx is None else F[idx]

    def normalized(self, F):
        return (np.asarray(F, dtype=float) - self.lower) / self.span

    def result_path(self, idx):
        return os.path.abspath(self.run.file(os.path.join('candidates', f'{idx:04d}.json')))

    def evaluate(self, metas):
        """Train the candidates (dicts with genome, generation, phase, subproblem, prediction) as independent jobs;
        record them in candidate order. Sequentially, each is recorded as soon as it is trained."""
        start = len(self.archive)
        jobs = [(self.job_cfg, start + k, m['genome'], self.result_path(start + k))
                for k, m in enumerate(metas)]
        names = [f'candidate {start + k}' for k in range(len(jobs))]
        if self.cfg['PARALLEL'] == 'off':
            for job, name, meta in zip(jobs, names, metas):
                self.record(parallel.map_jobs(train_candidate, [job], 'off', [name], self.run.log)[0], meta)
            return list(range(start, len(self.archive)))
        try:
            results = parallel.map_jobs(train_candidate, jobs, self.cfg['PARALLEL'], names, self.run.log,
                                        gpus=0 if self.cfg['DEVICE'] == 'cpu' else None)
        except parallel.JobsFailed as e:  # the others are done and saved: a resume trains only what is missing
            raise utils.UserError(f'{e}; the finished candidates are kept: --RESUME={self.run.path} trains the '
                                  'missing ones') from None
        for result, meta in zip(results, metas):
            self.record(result, meta)
        return list(range(start, len(self.archive)))

    def record(self, result, meta):
        geno, C, cells, lr = self.space.decode(result['genome'])
        row = {**meta, **result, 'genome': tuple(result['genome']), 'genotype': geno, 'C': C, 'cells': cells, 'lr': lr}
        self.archive.append(row)
        self.out.evaluated(self.archive)
        tboard.evolve_candidate(self.board, row)
        if len(self.archive) == 1:
            fewest, most = planned_candidates(self.cfg)
            self.run.log(f'  the first candidate took {result["seconds"]:.0f} s: {fewest} to {most} candidates take '
                         f'roughly {engine.duration(fewest * result["seconds"])} to '
                         f'{engine.duration(most * result["seconds"])} one after the other (sizes vary by genome)')

    def neighbours(self, sub):
        """(subproblem indices, normalized points of their current members) of the neighbourhood of `sub`."""
        hood = self.hood[sub]
        return hood, self.normalized(self.F([self.population[j] for j in hood]))

    def replace_neighbours(self, sub, child):
        """MOEA/D update: the child (archive index) takes the place of every neighbour of `sub` whose PBI value under
        that neighbour's weight vector is >= its own (sm.replaced)."""
        hood, points = self.neighbours(sub)
        for k in sm.replaced(self.normalized(self.F(child)), points, self.weights[hood], self.cfg['THETA']):
            self.population[hood[k]] = child

    def screen(self, sub, point):
        """Pre-screening of a child of `sub` by its predicted normalized point: would it replace a neighbour?"""
        hood, points = self.neighbours(sub)
        return sm.beats_a_neighbour(point, points, self.weights[hood], self.cfg['THETA'])

    def child(self, sub, rate, value_probs, planned):
        parents = self.rng.choice(self.hood[sub], size=2, replace=False)
        seen = {r['genome'] for r in self.archive} | planned
        genome = eg.make_child(self.space, [self.archive[self.population[p]]['genome'] for p in parents], rate,
                               value_probs, seen, self.rng)
        planned.add(genome)
        return genome

    def initialize(self):
        """Train a Latin-hypercube sample, then order it onto the weight vectors (sm.initial_order)."""
        genomes = eg.latin_hypercube(self.space, self.cfg['POPULATION'], self.rng)
        done = self.evaluate([{'generation': 0, 'phase': 'init', 'subproblem': '', 'genome': g} for g in genomes])
        self.population = [done[k] for k in sm.initial_order(self.F(done))]
        self.run.log('initial population onto the weight vectors (lowest f1 on w = (1, 0)): '
                     + ' '.join(f'{i}: #{c}' for i, c in enumerate(self.population)))

    def learning_generation(self, g):
        """Every subproblem gets a child bred from the population as it was at the generation's start; the children
        are trained as independent jobs, then the replacements are applied in subproblem order."""
        rate = eg.mutation_rate(g, self.cfg['GENERATIONS'], len(self.space))
        probs, planned = eg.uniform_value_probs(self.space), set()
        metas = [{'generation': g, 'phase': 'learning', 'subproblem': i, 'genome': self.child(i, rate, probs, planned)}
                 for i in range(self.cfg['POPULATION'])]
        done = self.evaluate(metas)
        for meta, idx in zip(metas, done):
            self.replace_neighbours(meta['subproblem'], idx)
        return done

    def surrogate_predict(self, genomes):
        """Refit the forest on every evaluated candidate; (mean, std) of normalized f1 for `genomes`."""
        lower, span = self.lower, self.span
        surrogate = sm.Surrogate().fit([r['genome'] for r in self.archive], self.F()[:, 1],
                                       (self.F()[:, 0] - lower[0]) / span[0])
        f2 = [np.log(self.space.params(g)) for g in genomes]
        mean, std = surrogate.predict(genomes, f2)
        return np.column_stack([mean, (np.asarray(f2) - lower[1]) / span[1]]), std, lower[0] + mean * span[0]

    def exploitation_generation(self, g):
        """Subproblems drawn by their success probabilities, gene values by their f1 scores; the surrogate
        pre-screens: a child predicted to beat a neighbour is trained at once, the others wait in the pool, from
        which the non-dominated, the lowest predicted f1 and the most uncertain are trained at the end."""
        cfg = self.cfg
        rate = eg.mutation_rate(g, cfg['GENERATIONS'], len(self.space))
        value_probs = sm.gene_value_probs([r['genome'] for r in self.archive], self.F()[:, 0], self.space.sizes,
                                          worst_f1(cfg['ALPHA'], cfg['BETA']), cfg['EXPLORE'])
        done, pool, planned = [], [], set()
        for sub in sm.draw_subproblems(self.counts, cfg['POPULATION'], cfg['EXPLORE'], self.rng):
            genome = self.child(sub, rate, value_probs, planned)
            point, std, f1_pred = self.surrogate_predict([genome])
            meta = {'generation': g, 'phase': 'exploitation', 'subproblem': sub, 'genome': genome,
                    'predicted_f1': float(f1_pred[0]), 'predicted_std': float(std[0])}
            if self.screen(sub, point[0]):
                done += self.evaluate([{**meta, 'screening': 'beats a neighbour'}])
                self.replace_neighbours(sub, done[-1])
            else:
                pool.append(meta)
        if pool:
            point, std, f1_pred = self.surrogate_predict([m['genome'] for m in pool])
            front_F = self.normalized(self.F(sm.front(self.F())))
            chosen = [{**pool[i], 'predicted_f1': float(f1_pred[i]), 'predicted_std': float(std[i]),
                       'screening': 'pool'} for i in sm.pool_choice(point, std, front_F)]
            trained = self.evaluate(chosen)
            for meta, idx in zip(chosen, trained):
                self.replace_neighbours(meta['subproblem'], idx)
            done += trained
        return done

    def end_generation(self, g, children):
        """Credit the subproblems whose children entered the best-POPULATION set; log the front and hypervolume."""
        self.counts = sm.credit(self.counts, children, sm.best_set(self.F(), self.cfg['POPULATION']),
                                {idx: self.archive[idx]['subproblem'] for idx in children})
        members = sm.front(self.F())
        worst = 1.0 + self.cfg['ALPHA'] + self.cfg['BETA']
        hv = sm.hypervolume(self.F(members), (worst, np.log(1e8)))
        n, (fewest, most) = len(self.archive), planned_candidates(self.cfg, g)
        done = f'{100 * n / (n + most):.0f}%' + (f' to {100 * n / (n + fewest):.0f}%' if fewest != most else '')
        self.run.log(f'generation {g:2d} of {self.cfg["GENERATIONS"] - 1}: {len(children)} trained, {n} in all '
                     f'({done} of the {n + fewest}' + (f' to {n + most}' if fewest != most else '')
                     + ' candidates); front of '
                     f'{len(members)} (f1, M params): '
                     + ' '.join(f'#{i} ({self.archive[i]["f1"]:.3f}, {self.archive[i]["params"] / 1e6:.3f})'
                                for i in members)
                     + f' | hypervolume {hv:.4f} (reference f1 {worst:.2f}, ln 1e8)')
        tboard.evolve_generation(self.board, g, hv, self.archive, members, self.run.file('pareto.png'))
        return hv


def main(**overrides):
    if overrides.get('RESUME'):
        refuse_older_run(overrides['RESUME'])
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    check_inputs(cfg)
    if cfg['RESUME']:  # a damaged result file is named before the outputs below are deleted
        check_candidates(os.path.join(cfg['RESUME'], 'candidates'))
    run = runfolder.Run('train_evolve', cfg, cfg['RUNS'], cfg['TAG'], path=cfg['RESUME'] or None)
    run.header(cfg, cfg['DEVICE'])
    os.makedirs(run.file('candidates'), exist_ok=True)
    if cfg['RESUME']:
        # The search is replayed from its seed: finished candidates are read from candidates/, so every decision
        # is taken again exactly as before; the outputs are rebuilt on the way.
        for name in ('evaluations.csv', 'pareto.csv'):
            if os.path.exists(run.file(name)):
                os.remove(run.file(name))
        shutil.rmtree(run.file('front'), ignore_errors=True)
        done = [n for n in os.listdir(run.file('candidates')) if RESULT_NAME.fullmatch(n)]
        run.log(f'resuming: replaying the search, {len(done)} candidates are done')
    fewest, most = planned_candidates(cfg)
    run.log(f'{fewest} to {most} candidates: {cfg["POPULATION"]} at initialization and in each of '
            f'{cfg["LEARNING_GENERATIONS"]} learning generations, then 1 to {cfg["POPULATION"]} in each of '
            f'{cfg["GENERATIONS"] - 1 - cfg["LEARNING_GENERATIONS"]} exploitation generations (the surrogate decides); '
            f'each trains up to {cfg["EPOCHS"]} epochs (the time is estimated after the first)')
    search = Search(cfg, run, Outputs(run, cfg))
    search.initialize()
    hv = search.end_generation(0, [])  # the initial population is nobody's offspring: no subproblem is credited
    for g in range(1, cfg['GENERATIONS']):
        learning = g <= cfg['LEARNING_GENERATIONS']
        children = search.learning_generation(g) if learning else search.exploitation_generation(g)
        hv = search.end_generation(g, children)
    members = sm.front(search.F())
    tboard.evolve_end(search.board, cfg['GENERATIONS'], search.archive, members)
    run.log(f'done: {len(search.archive)} candidates trained; front of {len(members)} in {run.file("pareto.csv")}; '
            f'retrain one with: python train_3D_continuation.py --GENOTYPE={run.file("front")}/<candidate>.json')
    return {'run': run.path, 'evaluated': len(search.archive), 'front': [search.archive[i] for i in members],
            'hypervolume': hv}


if __name__ == '__main__':
    settings.run_cli(main, DEFAULTS, 'the finished candidates are kept', kept=('candidates/*.json',))
