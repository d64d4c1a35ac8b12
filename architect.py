"""Architecture steps: first-order and DARTS second-order hypergradients of the validation loss.

The second-order virtual step w' = w - eta * (grad_w L_train + wd * w + momentum * buffer) is evaluated
functionally (torch.func.functional_call): no model is copied or rebuilt. The Hessian-vector product
d^2 L_train / (d alpha d w) . v is either DARTS' central finite difference at w +/- eps v, eps = r / ||v||
(hvp='fd', r = 0.01), or exact (hvp='exact'): double backward, d/d alpha of <grad_w L_train, v> with the
first gradient's graph kept. Both evaluate L_train at the same weights w with the same batch, in fp32, and
with BatchNorm in train mode (batch statistics) without tracking running statistics, unless track_bn (the
published code): then the forwards on the training batch at w and w +/- eps v, and first order's validation
forward at w, move the running statistics as a weight step's forward does (the one at w' never does: the
published code runs it on a copy of the network).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from model_search import zero_one_loss
from utils import UserError

HYPERGRADS = ('second', 'first', 'zeroth')
HVPS = ('fd', 'exact')  # Hessian-vector product of the second order: finite difference or double backward


@contextlib.contextmanager
def keep_buffers(model):
    """Leave the model's buffers (BatchNorm running statistics) untouched by the forward passes inside.

    Architecture steps run forward passes in train mode, at the virtual weights w', at w +/- eps v and on
    validation batches; none of these are the network's weights, so their statistics must not leak into the
    running averages used in evaluation: an architecture step changes the alphas/betas and nothing else.
    Inside, BatchNorm layers still normalize with the batch's statistics but do not track them (nothing to
    save and restore: the default supernet has ~4800 buffers, and copying them was ~10 % of a step's ops).
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextlib.contextmanager
def full_precision(model):
    """Switch the model's bf16 autocast off: a finite difference of size ~1e-2/||v|| is below bf16's resolution."""
    amp = getattr(model, 'amp', False)
    model.amp = False
    try:
        yield
    finally:
        model.amp = amp


class Architect:
    def __init__(self, model, w_optimizer, a_optimizer, order='second', zero_one='l2', zero_one_weight=10.0,
                 hvp_r=1e-2, hvp='fd', track_bn=False):
        if hvp not in HVPS:
            raise UserError(f'unknown HVP {hvp!r} (known: {", ".join(HVPS)})')
        self.model = model
        self.hvp_r = hvp_r
        self.hvp = hvp
        self.w_optimizer = w_optimizer
        self.a_optimizer = a_optimizer
        self.order = order
        self.zero_one = zero_one
        self.zero_one_weight = zero_one_weight
        self.track_bn = track_bn  # the step's forwards at the network's weights move its BN running statistics
        self.arch = model.arch_parameters()
        arch_ids = {id(p) for p in self.arch}
        self.w_names = [n for n, p in model.named_parameters() if id(p) not in arch_ids]

    def state_dict(self):
        return {}  # stateless: the optimizers are checkpointed by the caller

    def load_state_dict(self, state):
        pass

    def arch_loss(self, logits, y):
        """Validation objective: cross-entropy + weight * zero-one loss of the architecture weights."""
        return F.cross_entropy(logits, y) + self.zero_one_weight * zero_one_loss(self.model, self.zero_one)

    def _call(self, weights, x):
        """Model output with the weight parameters replaced by `weights` (name -> tensor)."""
        return functional_call(self.model, weights, (x,), strict=False)

    def step(self, x_train, y_train, x_val, y_val, eta):
        """One architecture update; eta is the current weight learning rate. Returns the validation loss."""
        self.a_optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if self.track_bn else keep_buffers(self.model):
            if self.order == 'first':
                loss = self.arch_loss(self.model(x_val), y_val)
                grads = torch.autograd.grad(loss, self.arch)
            else:
                loss, grads = self.second_order_grads(x_train, y_train, x_val, y_val, eta)
        for p, g in zip(self.arch, grads):
            p.grad = g
        self.a_optimizer.step()
        return loss.detach()

    def virtual_weights(self, x_train, y_train, eta):
        """w' after one SGD step on the training batch (momentum and weight decay as the weight optimizer)."""
        params = dict(self.model.named_parameters())
        w = [params[n] for n in self.w_names]
        loss = F.cross_entropy(self.model(x_train), y_train)
        grads = torch.autograd.grad(loss, w)
        group = self.w_optimizer.param_groups[0]
        momentum, wd = group['momentum'], group['weight_decay']
        buffers = [self.w_optimizer.state.get(p, {}).get('momentum_buffer') for p in w]
        moving = [i for i, b in enumerate(buffers) if b is not None]
        # Multi-tensor (foreach) ops: a few launches for all ~500 weight tensors instead of a few each.
        with torch.no_grad():
            d = torch._foreach_add(list(grads), w, alpha=wd)
            if moving:
                torch._foreach_add_([d[i] for i in moving], [buffers[i] for i in moving], alpha=momentum)
            if isinstance(eta, torch.Tensor):  # a device learning rate (graphs.py): an alpha would be read on the host
                return dict(zip(self.w_names, torch._foreach_sub(w, torch._foreach_mul(d, eta))))
            return dict(zip(self.w_names, torch._foreach_add(w, d, alpha=-eta)))

    def second_order_grads(self, x_train, y_train, x_val, y_val, eta):
        w_virtual = {n: t.requires_grad_() for n, t in self.virtual_weights(x_train, y_train, eta).items()}
        names = list(w_virtual)
        # w' are not the network's weights (nested in step's keep_buffers: a no-op); backward inside too, where
        # checkpointed cells are recomputed as they ran
        with keep_buffers(self.model):
            loss = self.arch_loss(self._call(w_virtual, x_val), y_val)
            grads = torch.autograd.grad(loss, self.arch + [w_virtual[n] for n in names])
        d_arch, v = grads[:len(self.arch)], dict(zip(names, grads[len(self.arch):]))
        if self.hvp == 'exact':
            implicit = self.exact_hessian_vector_product(v, x_train, y_train)
        else:
            implicit = self.hessian_vector_product(v, x_train, y_train, self.hvp_r)
        return loss, [d - eta * h for d, h in zip(d_arch, implicit)]

    def hessian_vector_product(self, v, x, y, r=1e-2):
        """(d/d alpha) (grad_w L_train . v) by central difference at w +/- eps v, eps = r / ||v||."""
        names, vs = list(v), list(v.values())
        eps = r / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(vs)))
        params = dict(self.model.named_parameters())
        w = [params[n] for n in names]
        with torch.no_grad():
            step = torch._foreach_mul(vs, eps)
        out = []
        with full_precision(self.model):
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    shifted = torch._foreach_add(w, step, alpha=sign)
                loss = F.cross_entropy(self._call(dict(zip(names, shifted)), x), y)
                out.append(torch.autograd.grad(loss, self.arch))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*out)]

    def exact_hessian_vector_product(self, v, x, y):
        """(d/d alpha) (grad_w L_train . v) at the current weights w, by double backward (exact up to rounding).

        The first gradient keeps its graph (create_graph), so <grad_w L, v> is a function of alpha whose gradient
        is the mixed second derivative applied to v. Cost: about one forward, one backward and the backward of
        that backward; memory: the first backward's graph is kept until the second has run. In fp32 (autocast off)
        like the finite difference; BatchNorm as the caller set it (keep_buffers: batch statistics, not tracked).
        """
        names = list(v)
        params = dict(self.model.named_parameters())
        w = [params[n] for n in names]
        with full_precision(self.model):
            loss = F.cross_entropy(self.model(x), y)
            grads = torch.autograd.grad(loss, w, create_graph=True)
            dot = torch.stack([(g * v[n]).sum() for g, n in zip(grads, names)]).sum()
            # allow_unused: an architecture tensor that does not reach L_train (e.g. betas with EDGE_WEIGHTS off)
            out = torch.autograd.grad(dot, self.arch, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, self.arch)]
