"""The genome of the evolutionary search (train_evolve.py): categorical genes for the cells and the macro settings,
its decoding into a genotype, initialization, crossover, mutation, and the memory guard.

A genome is a tuple of gene values (value indices). Per cell (normal, then reduce) and per node i (0..3):
  inputs of node i: an index into the pairs (a, b), a < b, of its 2 + i earlier states (1, 3, 6, 10 pairs),
  op on input a, op on input b: indices into the candidate ops;
then the macro genes: initial channels (index into FILTERS), number of cells (CELLS), learning rate (LRS).
Every combination of values decodes to a valid network (two distinct inputs per node, known ops), so crossover
and mutation cannot produce an invalid genome; only the memory guard can reject one.
"""
import itertools
import math

import numpy as np
import torch

from genotypes import Genotype
from model import NetworkLUNA
from utils import UserError

CELL_TYPES = ('normal', 'reduce')
STEPS = 4  # intermediate nodes per cell
OPTIMIZER_SLOTS = 4  # fp32 copies per parameter in a training step: weights, gradients, momentum, clipping scratch
MAX_TRIES = 10000  # draws / mutations tried for a new genome that fits before giving up


class GeneSpace:
    """Genes, their number of values, decoding, and the memory guard for one search configuration."""

    def __init__(self, primitives, filters, cells, lrs, cube, batch, memory_gb):
        self.primitives, self.filters, self.cells, self.lrs = list(primitives), list(filters), list(cells), list(lrs)
        self.cube, self.batch, self.memory_gb = cube, batch, memory_gb
        self.pairs = [list(itertools.combinations(range(2 + i), 2)) for i in range(STEPS)]
        # per cell type and node: its input pair, its two ops; then C, cells, learning rate
        self.sizes = [n for _ in CELL_TYPES for i in range(STEPS)
                      for n in (len(self.pairs[i]), len(self.primitives), len(self.primitives))]
        self.sizes += [len(self.filters), len(self.cells), len(self.lrs)]
        self._cost = {}

    def __len__(self):
        return len(self.sizes)

    def decode(self, genome):
        """(Genotype, channels, cells, learning rate) of a genome."""
        genome = tuple(int(v) for v in genome)
        if len(genome) != len(self) or any(not 0 <= v < n for v, n in zip(genome, self.sizes)):
            raise ValueError(f'genome {genome} does not fit the gene sizes {self.sizes}')
        cells = {}
        for c, cell in enumerate(CELL_TYPES):
            edges = []
            for i in range(STEPS):
                pair, op_a, op_b = genome[3 * (c * STEPS + i):3 * (c * STEPS + i) + 3]
                a, b = self.pairs[i][pair]
                edges += [(self.primitives[op_a], a), (self.primitives[op_b], b)]
            cells[cell] = edges
        concat = list(range(2, 2 + STEPS))
        geno = Genotype(normal=cells['normal'], normal_concat=concat, reduce=cells['reduce'], reduce_concat=concat)
        return geno, self.filters[genome[-3]], self.cells[genome[-2]], self.lrs[genome[-1]]

    def cost(self, genome):
        """(trainable parameters, estimated GPU memory of one training step in GB), cached per genome.

        Memory = 4 bytes x (BATCH x the output elements of every leaf module in one training forward at CUBE^3
        + OPTIMIZER_SLOTS x parameters). Autograd keeps about one tensor per leaf output for backward, so the first
        term is the activation memory. Counted on the meta device (shapes only, nothing allocated). Checked
        against measurements of the paper network (C=36, 20 cells, 32^3): 5.49 GiB per sample estimated, 5.38 GiB
        per extra sample measured on a CPU; at batch 4 23.8 GB estimated, 22.96 GB measured on an H100."""
        key = tuple(int(v) for v in genome)
        if key not in self._cost:
            geno, C, cells, _ = self.decode(key)
            self._cost[key] = network_cost(geno, C, cells, self.cube, self.batch)
        return self._cost[key]

    def params(self, genome):
        return self.cost(genome)[0]

    def f2_range(self):
        """(ln parameters) of the smallest and the largest network of the space: every op gene at the op giving the
        fewest / most parameters, C and cells at their extremes (parameters add up over the edges' ops)."""
        n_cell_genes = len(self.sizes) - 3

        def extreme(op, pick):
            macro = [self.filters.index(pick(self.filters)), self.cells.index(pick(self.cells)), 0]
            return self.params([0 if j % 3 == 0 else op for j in range(n_cell_genes)] + macro)
        ops = range(len(self.primitives))
        return (math.log(min(extreme(k, min) for k in ops)), math.log(max(extreme(k, max) for k in ops)))

    def fits(self, genome):
        return self.cost(genome)[1] <= self.memory_gb

    def random(self, rng):
        return tuple(int(rng.integers(n)) for n in self.sizes)


def network_cost(genotype, C, cells, cube, batch):
    """(parameters, estimated training-step memory in GB) of NetworkLUNA(C, 2, cells, genotype) at batch x cube^3."""
    with torch.device('meta'):
        model = NetworkLUNA(C, 2, cells, genotype)
    n_params = sum(p.numel() for p in model.parameters())
    count = [0]

    def leaf_output(module, inputs, output):
        count[0] += output.numel()
    hooks = [m.register_forward_hook(leaf_output) for m in model.modules() if not list(m.children())]
    with torch.no_grad():  # the model's forward without its autocast context (meta tensors have none)
        s0 = s1 = model.stem(torch.empty(1, 1, cube, cube, cube, device='meta'))
        for cell in model.cells:
            s0, s1 = s1, cell(s0, s1, 0.0)
    for h in hooks:
        h.remove()
    return n_params, 4 * (batch * count[0] + OPTIMIZER_SLOTS * n_params) / 1e9


def latin_hypercube(space, n, rng):
    """n distinct genomes that fit: a Latin hypercube sample of the genes (pymoo's sampling on the unit cube, each
    gene's interval cut into equal parts per value). A sample that repeats an earlier one or does not fit the memory
    is replaced by a uniform random genome that does (so the design is a Latin hypercube up to those draws)."""
    from pymoo.operators.sampling.lhs import sampling_lhs
    unit = sampling_lhs(n, len(space), criterion=None, random_state=rng)
    out = []
    for row in unit:
        genome = tuple(min(int(u * size), size - 1) for u, size in zip(row, space.sizes))
        tries = 0
        while genome in out or not space.fits(genome):
            tries += 1
            if tries > MAX_TRIES:
                raise UserError(f'no {n} distinct genomes fit MEMORY_GB={space.memory_gb}: '
                                'enlarge it or the gene ranges')
            genome = space.random(rng)
        out.append(genome)
    return out


def crossover(a, b, rng):
    """Uniform crossover: each gene from parent a or b with probability 1/2."""
    take_a = rng.random(len(a)) < 0.5
    return tuple(int(x if t else y) for x, y, t in zip(a, b, take_a))


def mutation_rate(generation, generations, n_genes):
    """Per-gene mutation probability at a generation (EMONAS' rule, scaled to the genome's length n):
    max(fi0 (1 - ln(g + 1) / ln(G)), 1 / n) with fi0 = min(20 / n, 1). For EMONAS' 10 genes: 1 at the start, 0.1
    floor; for our 27: 0.74 and 1/27, so about 16 genes mutate at generation 1 (of 40), 1 per child at the end."""
    start = min(20.0 / n_genes, 1.0)
    return max(start * (1.0 - math.log(generation + 1) / math.log(generations)), 1.0 / n_genes)


def mutate_once(genome, rate, value_probs, rng):
    """Each gene with more than one value changes with probability `rate`, to a value drawn from value_probs[gene]
    (a probability per value) among the values other than the current one."""
    out = list(genome)
    for g, probs in enumerate(value_probs):
        if len(probs) < 2 or rng.random() >= rate:
            continue
        p = np.array(probs, dtype=float)
        p[out[g]] = 0.0
        p = p / p.sum() if p.sum() > 0 else np.where(np.arange(len(p)) == out[g], 0.0, 1.0 / (len(p) - 1))
        out[g] = int(rng.choice(len(p), p=p))
    return tuple(out)


def make_child(space, parents, rate, value_probs, seen, rng):
    """Crossover of two parents, then mutation repeated until the genome is not in `seen` and fits the memory."""
    child = crossover(parents[0], parents[1], rng)
    for _ in range(MAX_TRIES):
        child = mutate_once(child, rate, value_probs, rng)
        if child not in seen and space.fits(child):
            return child
    raise UserError(f'no new genome that fits MEMORY_GB={space.memory_gb} found in {MAX_TRIES} mutations: '
                    'the gene ranges are (nearly) exhausted')


def uniform_value_probs(space):
    return [np.full(n, 1.0 / n) for n in space.sizes]


# Measured on one H100 (BENCHMARKS.md, 2026-11-23): a retrain step of the paper genotype (C=36, 20 cells, 32^3,
# batch 4, Triton kernels) takes 0.305 s and issues 6177 operations (CPU profile), i.e. ~309 per cell.
REF_STEP_S, REF_C, REF_CELLS, REF_CUBE, REF_BATCH = 0.305, 36, 20, 32, 4
OPS_PER_CELL, LAUNCH_S = 309, 12e-6  # host floor: operations per cell and step, host time per launch (10-16 us)


def step_seconds_estimate(genotype, C, cells, cube, batch, ref_elements):
    """Estimated H100 training-step time of a candidate: the paper network's measured step scaled by the activation
    elements (these steps are memory-bound), but at least the host time of launching its operations. ESTIMATE."""
    n_params, gb = network_cost(genotype, C, cells, cube, batch)
    elements = gb * 1e9 / 4 - OPTIMIZER_SLOTS * n_params
    return max(REF_STEP_S * elements / ref_elements, cells * OPS_PER_CELL * LAUNCH_S)


def search_hours_estimate(space, n_train, n_val, epochs, evaluations, samples, rng):
    """Estimated H100 hours of a search: `evaluations` candidates of `epochs` epochs each (no early stop, so an upper
    bound per candidate), the step time averaged over `samples` random genomes; an epoch = its training steps + the
    forward passes over search-train and search-val (a forward counted as 1/3 of a step). ESTIMATE, not measured."""
    from genotypes import NAS_HBO_PAPER
    ref_params, ref_gb = network_cost(NAS_HBO_PAPER, REF_C, REF_CELLS, REF_CUBE, REF_BATCH)
    ref_elements = ref_gb * 1e9 / 4 - OPTIMIZER_SLOTS * ref_params
    steps = [step_seconds_estimate(*space.decode(space.random(rng))[:3], space.cube, space.batch, ref_elements)
             for _ in range(samples)]
    per_epoch = float(np.mean(steps)) * (math.ceil(n_train / space.batch) + (n_train + n_val) / space.batch / 3)
    return evaluations * epochs * per_epoch / 3600, float(np.mean(steps))
