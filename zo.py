"""ZO-DARTS+ zeroth-order hypergradient: no Hessian-vector products.

Every T weight steps a direction u is drawn uniformly on the unit sphere over all architecture
parameters. During those T steps a twin copy of the weights takes the same SGD steps (same batches,
learning rate, momentum state, clipping) with the architecture frozen at alpha + mu * u, mu = MU * ||alpha||.
Then, on one validation batch at alpha, with g_a = dL/d alpha, g_w = dL/dw, delta = (w_twin - w) / mu:
h = (g_a . u + g_w . delta) * u, a directional estimate of the hypergradient, goes to the architecture optimizer.
"""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

from architect import keep_buffers
from model_search import zero_one_loss


def random_direction(shapes, gen=None, device='cpu', dtype=None):
    """A list of tensors of the given shapes, jointly uniform on the unit sphere, and their flat concatenation."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=dtype)
    flat = flat / flat.norm()
    return [part.view(s) for part, s in zip(torch.split(flat, sizes), shapes)], flat


def estimate(g_arch, g_w, w, w_twin, u, mu):
    """h = (g_a . u + g_w . (w_twin - w) / mu) * u, for lists of tensors (u as a list shaped like g_arch)."""
    directional = sum((g * d).sum() for g, d in zip(g_arch, u))
    if isinstance(mu, torch.Tensor):  # a float64 tensor from ZerothOrder: divide in the gradients' precision
        mu = mu.to(directional.dtype)
    directional = directional + sum((g * (t - p)).sum() for g, p, t in zip(g_w, w, w_twin)) / mu
    return [directional * d for d in u]


class ZerothOrder:
    def __init__(self, model, w_opt, a_opt, T, mu_rel, grad_clip, zero_one='off', zero_one_weight=0.0,
                 loss_fn=F.cross_entropy):
        self.model, self.w_opt, self.a_opt = model, w_opt, a_opt
        self.T, self.mu_rel, self.grad_clip = T, mu_rel, grad_clip
        self.zero_one, self.zero_one_weight = zero_one, zero_one_weight
        self.loss_fn = loss_fn
        self.arch = model.arch_parameters()
        arch_ids = {id(p) for p in self.arch}
        names = {id(p): n for n, p in model.named_parameters()}
        self.arch_names = [names[id(p)] for p in self.arch]
        self.w_names = [n for n, p in model.named_parameters() if id(p) not in arch_ids]
        self.params = [dict(model.named_parameters())[n] for n in self.w_names]
        self.count = 0  # weight steps taken in the current period
        self.twin = None  # dict: weights, buffers, optimizer, direction, mu
        # persistent (graphs.py, CUDA_GRAPHS): one twin's tensors for all periods, refilled in place at each period's
        # start, so that captured steps keep reading and writing the same memory
        self.persistent = False
        self.store = None

    def make_persistent(self):
        """Keep one twin's tensors for the rest of the run, refilled in place at each period's start (CUDA_GRAPHS:
        a captured step reads and writes the same memory); a twin of a resumed period becomes that store."""
        self.persistent = True
        self.store = self.twin

    def _start_period(self):
        dev = self.arch[0].device
        u, _ = random_direction([p.shape for p in self.arch], device=dev, dtype=self.arch[0].dtype)
        # mu = max(mu_rel * ||alpha||, 1e-8) stays on the device (no host sync): a 0-dim float64 tensor holding the
        # value the Python float had (the fp32 norm times mu_rel in double); ops with fp32 tensors round it to fp32.
        norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in self.arch))
        mu = (norm.double() * self.mu_rel).clamp_min(1e-8)
        if self.persistent and self.store is not None:
            self._refill(u, mu)
            return
        weights = [p.detach().clone().requires_grad_() for p in self.params]
        opt = torch.optim.SGD(weights, lr=self.w_opt.param_groups[0]['lr'])
        # Same hyperparameters and momentum buffers. load_state_dict keeps the tensors it is given, so copy
        # them: shared buffers would be advanced twice per step, by the twin and by the real optimizer.
        opt.load_state_dict(copy.deepcopy(self.w_opt.state_dict()))
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.twin = {'weights': weights, 'opt': opt, 'buffers': buffers, 'u': u, 'mu': mu}
        self.count = 0
        if self.persistent:
            self.store = self.twin

    @torch.no_grad()
    def _refill(self, u, mu):
        """A new period in the persistent twin: the same values _start_period would make, copied in place."""
        t = self.store
        torch._foreach_copy_(t['weights'], [p.detach() for p in self.params])
        for p, w in zip(self.params, t['weights']):
            src, state = self.w_opt.state.get(p, {}).get('momentum_buffer'), t['opt'].state[w]
            if src is None:
                state.pop('momentum_buffer', None)
            elif 'momentum_buffer' in state:
                state['momentum_buffer'].copy_(src)
            else:
                state['momentum_buffer'] = src.clone()
        for n, b in self.model.named_buffers():
            t['buffers'][n].copy_(b)
        torch._foreach_copy_(t['u'], u)
        t['mu'].copy_(mu)
        self.twin = t
        self.count = 0

    def _twin_step(self, x, y):
        t = self.twin
        frozen = {n: (p + t['mu'] * d).detach() for n, p, d in zip(self.arch_names, self.arch, t['u'])}
        values = {**dict(zip(self.w_names, t['weights'])), **frozen, **t['buffers']}
        loss = self.loss_fn(functional_call(self.model, values, (x,)), y)
        t['opt'].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t['weights'], self.grad_clip)
        for group in t['opt'].param_groups:
            group['lr'] = self.w_opt.param_groups[0]['lr']
        t['opt'].step()

    def weight_step(self, x, y, arch_on, val_stream, keep=None):
        """A weight step at alpha (and the twin's step at alpha + mu u); an architecture step every T.
        keep: as in engine.train_step, collects the batch's P(malignant) and labels."""
        val = self.begin(arch_on, val_stream)
        out = self.steps(x, y, val, keep)
        self.end(val)
        return out

    def begin(self, arch_on, val_stream):
        """The Python side of a weight step, before its tensor work (graphs.py replays that work): start a period
        if due, count the step; returns the validation batch when this step ends the period with an architecture
        step, else ()."""
        if arch_on and self.twin is None:
            self._start_period()
        if self.twin is None:
            return ()
        self.count += 1
        return tuple(val_stream.next()) if self.count >= self.T else ()

    def end(self, val):
        if val:
            self.twin = None

    def steps(self, x, y, val=(), keep=None):
        """The tensor work of a weight step: the twin's step (in a period), the weight step, then the architecture
        step on the validation batch `val` (when given). Returns (loss, number correct)."""
        if self.twin is not None:
            self._twin_step(x, y)
        self.w_opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        if keep is not None:
            keep.append((torch.softmax(logits.detach().float(), 1)[:, 1], y))
        loss = self.loss_fn(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        for p in self.arch:
            p.grad = None
        self.w_opt.step()
        if val:
            self.arch_step(*val)
        return loss.detach(), (logits.argmax(1) == y).sum()

    def arch_step(self, x_val, y_val):
        with keep_buffers(self.model):  # the validation forward must not move BN running statistics
            loss = self.loss_fn(self.model(x_val), y_val)
            if self.zero_one != 'off':
                loss = loss + self.zero_one_weight * zero_one_loss(self.model, self.zero_one)
            grads = torch.autograd.grad(loss, self.arch + self.params, allow_unused=True)
        g_arch = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[:len(self.arch)], self.arch)]
        g_w = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[len(self.arch):], self.params)]
        t = self.twin
        h = estimate(g_arch, g_w, [p.detach() for p in self.params], [w.detach() for w in t['weights']],
                     t['u'], t['mu'])
        self.a_opt.zero_grad(set_to_none=True)
        for p, g in zip(self.arch, h):
            p.grad = g.detach()
        self.a_opt.step()

    def state_dict(self):
        if self.twin is None:
            return {'count': self.count, 'twin': None}
        t = self.twin
        return {'count': self.count, 'twin': {'weights': [w.detach().clone() for w in t['weights']],
                                              'opt': t['opt'].state_dict(), 'buffers': t['buffers'],
                                              'u': t['u'], 'mu': t['mu']}}

    def load_state_dict(self, state):
        self.count = state.get('count', 0)
        saved = state.get('twin')
        if saved is None:
            self.twin = None
            return
        dev = self.arch[0].device
        weights = [w.to(dev).requires_grad_() for w in saved['weights']]
        opt = torch.optim.SGD(weights, lr=self.w_opt.param_groups[0]['lr'])
        opt.load_state_dict(saved['opt'])
        self.twin = {'weights': weights, 'opt': opt, 'buffers': {n: b.to(dev) for n, b in saved['buffers'].items()},
                     'u': [d.to(dev) for d in saved['u']],
                     'mu': torch.as_tensor(saved['mu'], dtype=torch.float64, device=dev)}
        if self.persistent:
            self.store = self.twin
