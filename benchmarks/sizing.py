"""BENCH='methods': how many epochs and candidates fit a time budget, from measured step times.

Pure functions of their arguments: benchmarks/methods.py measures the step times once and passes them in, so every
decision here is tested with worked examples (tests/test_bench_methods.py), never with the clock.

Cost model, in seconds:
- a pass over n cubes in batches of b is ceil(n / b) steps; an evaluation batch costs FORWARD_SHARE of a training
  step (a forward pass only);
- a DARTS-style search of E epochs: E // 2 warm-up epochs of weight steps, then E - E // 2 epochs of the method's
  step (architecture and weight step), every epoch followed by an evaluation of search-val;
- a genotype's retrain of E epochs on each test fold: a step per training batch, then the test fold evaluated;
- a candidate of the evolutionary search: its epochs, each followed by evaluating search-train and search-val (EMONAS'
  f1 reads both); its step is measured on the largest genome, so this is an upper bound;
- every script run adds overhead_s (reading the cubes, building the network, writing checkpoints).
Allocation: RESERVE of the budget stays unplanned. Of the rest, search_share goes to the searches, the same time to
each (the DARTS-style searches run the same epochs; the evolutionary search gets its share and whatever those left),
and the remainder to the retrains (every genotype the same epochs). When one side is held by its most epochs or
candidates, its unused time goes to the other. When not one retrain epoch fits, the search whose smallest run costs
most is dropped (with its retrain); a DARTS-style search of which not one epoch fits is dropped, the one of the
costliest step first, as is the evolutionary search when fewer than 3 x 2 candidates fit; each time, the others are
sized again without it.
"""
import math

FORWARD_SHARE = 0.5  # an evaluation batch, in training steps (forward only; about a third measured, rounded up)
RESERVE = 0.1  # share of the budget left unplanned: the estimates are rough and the last part must still fit
MIN_POPULATION = 3  # the evolutionary search's neighbourhood is 3 subproblems
MIN_GENERATIONS = 2  # initialization and one learning generation


def passes(n, batch):
    """Steps of one pass over n cubes (the last batch may be partial)."""
    return math.ceil(n / batch)


def search_s(epochs, step_s, warm_s, sizes, batch, overhead_s):
    """A DARTS-style search of `epochs` epochs whose search step takes step_s and weight step warm_s."""
    train, val = passes(sizes['search_train'], batch), passes(sizes['search_val'], batch)
    warm = epochs // 2
    return (overhead_s + warm * train * warm_s + (epochs - warm) * train * step_s
            + epochs * val * FORWARD_SHARE * warm_s)


def retrain_s(epochs, step_s, sizes, batch, overhead_s):
    """One genotype retrained for `epochs` on every test fold (sizes['retrain']: [training, test] cubes per fold)."""
    per_epoch = sum(passes(n_train, batch) + FORWARD_SHARE * passes(n_test, batch)
                    for n_train, n_test in sizes['retrain'])
    return overhead_s + epochs * per_epoch * step_s


def candidate_s(epochs, step_s, sizes, batch):
    """One candidate of the evolutionary search trained for `epochs` (early stopping can only shorten it)."""
    train, val = passes(sizes['search_train'], batch), passes(sizes['search_val'], batch)
    return epochs * (train + FORWARD_SHARE * (train + val)) * step_s


def most_that_fit(cost, most, budget):
    """The largest k in 1..most with cost(k) <= budget (cost grows with k); 0 when not even 1 fits."""
    k = 0
    while k < most and cost(k + 1) <= budget:
        k += 1
    return k


def evolution_size(candidates, most_population, most_generations):
    """(population, generations) for at most `candidates` trained: a quarter of them form the population (at least 3,
    at most most_population), so that from 12 candidates on the search has learning and exploitation generations
    after its initialization; (0, 0) below 3 x 2."""
    population = min(most_population, max(MIN_POPULATION, candidates // 4))
    generations = min(most_generations, candidates // population)
    return (population, generations) if generations >= MIN_GENERATIONS else (0, 0)


def _size(step_s, sizes, limits, darts, evolve, references, search_budget, retrain_budget):
    """Epochs and candidates of each side within its budget, and the seconds they take."""
    lim, over = limits, limits['overhead_s']
    n_retrain = len(darts) + bool(evolve) + references

    def genotype_s(k):
        return retrain_s(k, step_s['retrain'], sizes, lim['retrain_batch'], over)

    def searches(k):
        return {m: search_s(k, step_s[m], step_s['search warm-up'], sizes, lim['search_batch'], over) for m in darts}
    retrain_epochs = most_that_fit(lambda k: n_retrain * genotype_s(k), lim['retrain_epochs'], retrain_budget) \
        if n_retrain else 0
    n_search = len(darts) + bool(evolve)
    darts_budget = search_budget * len(darts) / n_search if n_search else 0.0
    epochs = most_that_fit(lambda k: sum(searches(k).values()), lim['search_epochs'], darts_budget) if darts else 0
    search_times = searches(epochs) if epochs else {}
    population = generations = 0
    evolve_s = 0.0
    if evolve:
        one = candidate_s(lim['candidate_epochs'], step_s['candidate'], sizes, lim['evolve_batch'])
        left = search_budget - sum(search_times.values()) - over
        population, generations = evolution_size(max(0, int(left // one)), lim['population'], lim['generations'])
        evolve_s = over + population * generations * one if population else 0.0
    return {'retrain_epochs': retrain_epochs, 'search_epochs': epochs, 'population': population,
            'generations': generations, 'search_s': search_times, 'evolve_s': evolve_s,
            'retrain_s': genotype_s(retrain_epochs) if retrain_epochs else 0.0, 'n_retrain': n_retrain,
            'searches_held': (not darts or epochs == lim['search_epochs'])
            and (not evolve or (population, generations) == (lim['population'], lim['generations'])),
            'retrains_held': n_retrain == 0 or retrain_epochs == lim['retrain_epochs']}


def _sized(step_s, sizes, limits, darts, evolve, references, usable):
    """_size with the search / retrain split, the unused time of a held side passed to the other once."""
    share = limits['search_share'] if darts or evolve else 0.0
    search_budget, retrain_budget = usable * share, usable * (1 - share)
    s = _size(step_s, sizes, limits, darts, evolve, references, search_budget, retrain_budget)
    used_retrain = s['n_retrain'] * s['retrain_s']
    used_search = sum(s['search_s'].values()) + s['evolve_s']
    if s['retrains_held'] and not s['searches_held']:
        search_budget, retrain_budget = search_budget + retrain_budget - used_retrain, used_retrain
    elif s['searches_held'] and not s['retrains_held']:
        search_budget, retrain_budget = used_search, retrain_budget + search_budget - used_search
    else:
        return s, search_budget, retrain_budget
    return _size(step_s, sizes, limits, darts, evolve, references, search_budget, retrain_budget), search_budget, \
        retrain_budget


def smallest_runs(step_s, sizes, limits, darts, evolve):
    """{search: seconds of its smallest run}: one epoch of a DARTS-style search, 3 x 2 candidates of the evolutionary
    search (which to drop first when not all fit)."""
    runs = {m: search_s(1, step_s[m], step_s['search warm-up'], sizes, limits['search_batch'], limits['overhead_s'])
            for m in darts}
    if evolve:
        runs['evolutionary'] = limits['overhead_s'] + MIN_POPULATION * MIN_GENERATIONS * candidate_s(
            limits['candidate_epochs'], step_s['candidate'], sizes, limits['evolve_batch'])
    return runs


def plan(step_s, sizes, budget_s, limits, darts, evolve, references):
    """Epochs and candidates of every part so that they fit budget_s.

    step_s: seconds per step of the kinds 'search warm-up', 'retrain', 'candidate' and of each DARTS-style search in
    `darts` (its kind, e.g. 'search 2nd'); sizes: search_train, search_val (cubes), retrain ([training, test] per test
    fold); limits: search_epochs, retrain_epochs, population, generations (most of each), candidate_epochs,
    search_batch, retrain_batch, evolve_batch, search_share, overhead_s; evolve: run the evolutionary search;
    references: genotypes retrained without a search (the paper's, random ones). Returns the sizes, the seconds
    planned per search and per retrained genotype, and the searches dropped with their reason."""
    usable = budget_s * (1 - RESERVE)
    darts, dropped = list(darts), {}
    while True:
        s, search_budget, retrain_budget = _sized(step_s, sizes, limits, darts, evolve, references, usable)
        if s['retrain_epochs'] == 0 and (darts or evolve):
            costs = smallest_runs(step_s, sizes, limits, darts, evolve)
            victim = max(costs, key=costs.get)
            dropped[victim] = 'not one retrain epoch fits the budget with its genotype among those retrained'
        elif darts and s['search_epochs'] == 0:
            victim = max(darts, key=lambda m: step_s[m])
            dropped[victim] = (f'not one search epoch fits its share of {search_budget / (len(darts) + evolve):.0f} '
                               's with the other searches')
        elif evolve and s['population'] == 0:
            victim = 'evolutionary'
            dropped[victim] = (f'fewer than {MIN_POPULATION * MIN_GENERATIONS} candidates fit its share of '
                               f'{search_budget - sum(s["search_s"].values()):.0f} s')
        else:
            break
        if victim == 'evolutionary':
            evolve = False
        else:
            darts.remove(victim)
    total = sum(s['search_s'].values()) + s['evolve_s'] + s['n_retrain'] * s['retrain_s']
    return {'budget_s': budget_s, 'usable_s': usable, 'search_budget_s': search_budget,
            'retrain_budget_s': retrain_budget, 'darts': darts, 'evolve': bool(evolve), 'dropped': dropped,
            'search_epochs': s['search_epochs'], 'warmup_epochs': s['search_epochs'] // 2,
            'retrain_epochs': s['retrain_epochs'], 'population': s['population'], 'generations': s['generations'],
            'candidate_epochs': limits['candidate_epochs'] if evolve else 0, 'search_s': s['search_s'],
            'evolve_s': s['evolve_s'], 'retrain_s': s['retrain_s'], 'planned_s': total}
