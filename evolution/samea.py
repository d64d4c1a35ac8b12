"""The pieces of SaMEA (EMONAS-Net's surrogate-assisted MOEA/D) used by train_evolve.py: weight vectors,
neighbourhoods, PBI, objective normalization, selection probabilities, the random-forest surrogate and its
pre-screening rules, non-dominated fronts and the hypervolume.

Objectives are minimized: F[:, 0] = f1 (error term), F[:, 1] = f2 = ln(parameters).
"""
import numpy as np


def weight_vectors(n):
    """EMONAS' n weight vectors: w1 = 0.5 + 0.5 i / (n - 1), w2 = 1 - w1 (error weighted at least as much as size).
    Returns (n, 2)."""
    w1 = 0.5 + 0.5 * np.arange(n) / (n - 1)
    return np.stack([w1, 1.0 - w1], axis=1)


def neighbourhoods(weights, t):
    """(n, t) indices of the t nearest weight vectors of each one (Euclidean; itself first; ties: lower index)."""
    # rounded so that equal distances compare equal despite floating-point noise
    dist = np.round(np.linalg.norm(weights[:, None, :] - weights[None, :, :], axis=2), 12)
    return np.argsort(dist, axis=1, kind='stable')[:, :t]


def pbi(F, weights, theta):
    """PBI value of each row of F (normalized objectives) under the matching row of weights, ideal point at the
    origin: d1 + theta d2 with d1 the length of F's projection on w and d2 its distance from the line (pymoo)."""
    from pymoo.decomposition.pbi import PBI
    F, weights = np.atleast_2d(np.asarray(F, dtype=float)), np.atleast_2d(np.asarray(weights, dtype=float))
    return PBI(theta=theta).do(F, weights, utopian_point=np.zeros(F.shape[1]))


def normalizer(f1_worst, f2_range):
    """(lower, span) of the objectives: F is normalized as (F - lower) / span with fixed bounds, f1 over
    [0, f1_worst] (a diverged candidate's f1) and f2 over f2_range (ln parameters of the smallest and largest networks
    of the gene space), so the ideal point stays at the origin and no candidate moves another's PBI value."""
    lower = np.array([0.0, f2_range[0]])
    span = np.array([f1_worst, f2_range[1] - f2_range[0]])
    return lower, np.where(span > 0, span, 1.0)


def _renormalized(score, extra):
    """score normalized to sum 1 (zeros while nothing scored), + extra / n, renormalized (uniform if all are 0)."""
    p = score / score.sum() if score.sum() > 0 else np.zeros_like(score)
    p = p + extra / len(p)
    return p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))


def subproblem_probs(counts, extra=0.2):
    """Probability of choosing each subproblem: its cumulative count of offspring that entered the best set,
    normalized, + extra / n, renormalized (uniform while no offspring entered it)."""
    return _renormalized(np.asarray(counts, dtype=float), extra)


def draw_subproblems(counts, n, extra, rng):
    """n subproblems drawn (with replacement) by subproblem_probs(counts, extra): the exploitation phase's choice of
    which subproblems breed its children (the counts do not change within a generation)."""
    return [int(s) for s in rng.choice(len(counts), size=n, p=subproblem_probs(counts, extra))]


def gene_value_probs(genomes, f1, sizes, f1_worst, extra=0.2):
    """Per gene, the probability of each value: score = f1_worst (the normalization's fixed upper bound of f1, as
    EMONAS' code; not the worst f1 seen so far) - mean f1 of the evaluated genomes carrying the value (0 for a value
    never seen), normalized, + extra / #values, renormalized."""
    genomes, f1 = np.asarray(genomes), np.asarray(f1, dtype=float)
    out = []
    for g, n in enumerate(sizes):
        score = np.zeros(n)
        for v in range(n):
            has = genomes[:, g] == v
            if has.any():
                score[v] = f1_worst - f1[has].mean()
        out.append(_renormalized(score, extra))
    return out


def initial_order(F):
    """The initial population ordered onto the weight vectors of weight_vectors(len(F)) (EMONAS): subproblem i gets
    the archive row order[i], the lowest f1 on the last vector w = (1, 0), the highest on w = (0.5, 0.5); equal f1:
    the smaller network nearer the vectors that weight size more."""
    F = np.asarray(F, dtype=float)
    return np.lexsort((-F[:, 1], F[:, 0]))[::-1].tolist()


def replaced(child_F, neighbour_F, neighbour_weights, theta):
    """MOEA/D's update decision: the positions k of the neighbours that the child replaces, those whose PBI value
    under their own weight vector neighbour_weights[k] is >= the child's under it (normalized points)."""
    n = len(neighbour_F)
    child = np.repeat(np.atleast_2d(np.asarray(child_F, dtype=float)), n, axis=0)
    return np.flatnonzero(pbi(child, neighbour_weights, theta) <= pbi(neighbour_F, neighbour_weights, theta)).tolist()


def credit(counts, children, best, subproblems):
    """Success counts after a generation: +1 to the subproblem of each child (archive index in `children`, bred by
    subproblems[child]) that entered the best set `best` (archive indices). Returns a new array."""
    out, best = np.array(counts, dtype=float), set(best)
    for idx in children:
        if idx in best:
            out[subproblems[idx]] += 1
    return out


def front(F):
    """Indices of the non-dominated rows of F (pymoo's non-dominated sorting), in increasing order."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    F = np.asarray(F, dtype=float)
    return np.sort(NonDominatedSorting().do(F, only_non_dominated_front=True))


def best_set(F, k):
    """Indices of the k best rows of F by non-dominated sorting, the last front cut by crowding distance (NSGA-II's
    survival; pymoo's sorting and crowding distance)."""
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
    F = np.asarray(F, dtype=float)
    chosen = []
    for layer in NonDominatedSorting().do(F):
        layer = np.asarray(layer)
        if len(chosen) + len(layer) <= k:
            chosen += layer.tolist()
            continue
        crowd = calc_crowding_distance(F[layer])
        order = np.argsort(-crowd, kind='stable')
        chosen += layer[order[:k - len(chosen)]].tolist()
        break
    return sorted(chosen)


def hypervolume(F, ref):
    """Hypervolume of F (raw objectives) against the reference point `ref` (pymoo)."""
    from pymoo.indicators.hv import HV
    F = np.asarray(F, dtype=float)
    inside = F[(F < np.asarray(ref)).all(axis=1)]
    return float(HV(ref_point=np.asarray(ref, dtype=float))(inside)) if len(inside) else 0.0


class Surrogate:
    """EMONAS' random forest: gene values + ln(parameters) -> normalized f1; uncertainty = std over the trees."""

    def __init__(self, seed=0):
        from sklearn.ensemble import RandomForestRegressor
        self.forest = RandomForestRegressor(n_estimators=100, min_samples_split=5, random_state=seed, n_jobs=1)

    @staticmethod
    def features(genomes, f2):
        return np.column_stack([np.asarray(genomes, dtype=float), np.asarray(f2, dtype=float)])

    def fit(self, genomes, f2, f1_normalized):
        self.forest.fit(self.features(genomes, f2), np.asarray(f1_normalized, dtype=float))
        return self

    def predict(self, genomes, f2):
        """(mean, std) of the trees' predictions of normalized f1, one per genome."""
        per_tree = np.stack([t.predict(self.features(genomes, f2)) for t in self.forest.estimators_])
        return per_tree.mean(axis=0), per_tree.std(axis=0)


def beats_a_neighbour(child_F, neighbour_F, neighbour_weights, theta):
    """Pre-screening: would the child's (predicted) normalized point replace some neighbour (replaced)? Then it is
    trained at once."""
    return bool(replaced(child_F, neighbour_F, neighbour_weights, theta))


def pool_choice(pool_F, pool_std, front_F):
    """Pool members to train after a generation's children (predicted normalized points pool_F, tree std pool_std):
    those on the front of the current front front_F together with the pool, then, among the others, the one with the
    lowest predicted f1, then the one with the largest std. Returns sorted pool indices."""
    pool_F, front_F = np.asarray(pool_F, dtype=float), np.asarray(front_F, dtype=float)
    both = np.concatenate([front_F.reshape(-1, pool_F.shape[1]), pool_F])
    dominated = [bool(((both <= p).all(axis=1) & (both < p).any(axis=1)).any()) for p in pool_F]
    chosen = [i for i, d in enumerate(dominated) if not d]
    for key in (pool_F[:, 0], -np.asarray(pool_std, dtype=float)):
        rest = [i for i in range(len(pool_F)) if i not in chosen]
        if rest:
            chosen.append(min(rest, key=lambda i: key[i]))
    return sorted(chosen)
