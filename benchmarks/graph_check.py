"""A graphed step equals the eager step: n steps both ways from the same initialization and batches, then the largest
differences of the weights, alphas/betas, BatchNorm statistics and optimizer buffers (bench_gpu writes them into its
JSON; tests/test_graphs.py runs the same on the CPU with a stand-in capture and, on a GPU, with CUDA graphs)."""
import torch

import graphs
import train_search
from genotypes import NAS_HBO_PAPER
from model import NetworkLUNA

# retrain, search 1st / 2nd order (fd, exact HVP), zeroth order. The zeroth order is not compared by bench_gpu: the
# fused SGD's rounding, divided by mu in its estimate and signed by Adam, makes it differ chaotically (its graph-ready
# logic is checked exactly on the CPU: tests/test_graphs.py)
KINDS = ('retrain', 'first', 'second', 'exact', 'zeroth')
ATOL, RTOL = 1e-4, 1e-3  # fp32 tolerance after 5 steps (the fused SGD and capturable Adam round differently)
SMALL = {'C': 8, 'LAYERS': 5, 'CUBE': 16, 'BATCH': 4}  # the networks compared (a GPU check of seconds)
SEARCH_OPS = ('max_pool_3x3x3', 'skip_connect', 'sep_conv_3x3x3', 'dil_conv_5x5x5')


def _batches(n, size, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size['BATCH'], 1, size['CUBE'], size['CUBE'], size['CUBE'], generator=g).to(device),
             torch.randint(0, 2, (size['BATCH'],), generator=g).to(device)) for _ in range(n)]


def state_of(model, *optimizers):
    """Weights, alphas/betas, BatchNorm statistics and the optimizers' tensors (momentum, Adam moments), by name."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, opt in enumerate(optimizers):
        for j, s in enumerate(opt.state.values()):
            out.update({f'opt{i}.{j}.{k}': v.detach().clone() for k, v in s.items() if torch.is_tensor(v)})
    return out


class _Val:
    def __init__(self, batches):
        self.it = iter(batches)

    def next(self):
        return next(self.it)


def run(kind, graphed, device, n=5, size=None, **graph_kw):
    """State after n steps of `kind` (KINDS) with CUDA_GRAPHS on or off; graph_kw go to StepGraphs (warmup, capture).
    The learning rate is annealed after every step (the in-place update of a graphed step's lr is exercised)."""
    size = size or SMALL
    torch.manual_seed(0)
    if kind == 'retrain':
        model = NetworkLUNA(size['C'], 2, size['LAYERS'], NAS_HBO_PAPER).to(device)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, 0.05, momentum=0.9, weight_decay=3e-4)
        optimizers, arch_on = (opt,), None
        step = graphs.retrain_step(model, opt, params, 5.0, graphed, **graph_kw)
    else:
        cfg = {**train_search.DEFAULTS, 'DEVICE': device, 'C': size['C'], 'LAYERS': size['LAYERS'],
               'CUBE': size['CUBE'], 'PRIMITIVES': SEARCH_OPS, 'ZO_T': 2, 'EPOCHS': n,
               'HYPERGRAD': 'second' if kind == 'exact' else kind, 'HVP': 'exact' if kind == 'exact' else 'fd'}
        model, opt, _, a_opt, updater = train_search.build(cfg)
        optimizers, arch_on = (opt, a_opt), True
        step = graphs.search_steps(model, opt, updater, 5.0, graphed, **graph_kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n)
    val = _Val(_batches(n, size, device, 1))
    torch.manual_seed(1)
    for x, y in _batches(n, size, device, 0):
        step(x, y) if arch_on is None else step(x, y, arch_on, val, [])
        sched.step()
    return state_of(model, *optimizers)


def compare(kind, device, n=5, size=None, **graph_kw):
    """{'max_abs': largest |graphed - eager|, 'worst': its tensor, 'equal': all within ATOL + RTOL |eager|,
    'tensors': how many compared} after n steps."""
    eager, ready = run(kind, False, device, n, size), run(kind, True, device, n, size, **graph_kw)
    worst, max_abs, equal = None, 0.0, eager.keys() == ready.keys()
    for k in eager.keys() & ready.keys():
        a, b = eager[k].double(), ready[k].double()
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        equal = equal and bool(((a - b).abs() <= ATOL + RTOL * a.abs()).all())
        if diff >= max_abs:
            worst, max_abs = k, diff
    return {'max_abs': max_abs, 'worst': worst, 'equal': equal, 'tensors': len(eager)}
