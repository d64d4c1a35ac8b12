"""The search supernet: partial-channel mixed ops, cells with op weights alpha and edge weights beta."""
import torch
import torch.nn.functional as F
from torch import nn

from genotypes import Genotype, derive_cell
from operations import FactorizedReduce, ReLUConvBN, cell_layout, make_op, stem
from sparsemax import sparsemax
from utils import UserError

WEIGHTINGS = ('sigmoid', 'softmax', 'sparsemax')


def channel_shuffle(x, groups):
    """(N, C, D, H, W) -> same shape, channels interleaved across `groups` groups."""
    n, c = x.shape[:2]
    return x.view(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class MixedOp(nn.Module):
    """Weighted sum of candidate ops on the first C/k channels; the rest bypass (max-pooled when reducing)."""

    def __init__(self, C, stride, primitives, k):
        super().__init__()
        self.k = k
        self.stride = stride
        self.ops = nn.ModuleList()
        for name in primitives:
            op = make_op(name, C // k, stride, affine=False)
            if 'pool' in name:
                op = nn.Sequential(op, nn.BatchNorm3d(C // k, affine=False))
            self.ops.append(op)

    def forward(self, x, weights):
        # x (N, C, D, H, W), weights (n_ops,) -> (N, C, D/stride, H/stride, W/stride)
        part = x.shape[1] // self.k
        active, bypass = x[:, :part], x[:, part:]
        out = sum(w * op(active) for w, op in zip(weights, self.ops))
        if self.stride == 2:
            bypass = F.max_pool3d(bypass, 2, 2)
        return channel_shuffle(torch.cat([out, bypass], dim=1), self.k)


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction, reduction_prev, primitives, k):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_pp, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self.ops = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1, primitives, k)
            for i in range(steps) for j in range(2 + i))

    def forward(self, s0, s1, weights, edge_weights):
        # weights (n_edges, n_ops), edge_weights (n_edges,); output (N, multiplier*C, ...)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            s = sum(edge_weights[offset + j] * self.ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """DARTS-style supernet for (N, 1, S, S, S) cubes.

    Architecture parameters (nn.Parameters, so they live in state_dict and checkpoints):
    alphas_normal/alphas_reduce (n_edges, n_ops) op weights, betas_normal/betas_reduce (n_edges,) edge weights.
    """

    def __init__(self, C, num_classes, layers, primitives, steps=4, multiplier=4, stem_multiplier=3, k=4,
                 weighting='sigmoid', edge_weights=True):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise UserError(f'unknown op weighting {weighting!r} (known: {", ".join(WEIGHTINGS)})')
        if C % k or layers < 3:
            raise UserError(f'C={C} must be divisible by PC_K={k}, and LAYERS={layers} must be >= 3')
        self.primitives = list(primitives)
        self.steps, self.multiplier = steps, multiplier
        self.weighting = weighting
        self.use_edge_weights = edge_weights
        self.tau = 1.0  # sparsemax temperature, set per epoch by the search loop
        self.amp = False  # bf16 autocast in forward (logits returned in fp32)
        self.stem = stem(stem_multiplier * C)
        plan, C_out = cell_layout(C, layers, multiplier, stem_multiplier)
        self.cells = nn.ModuleList(SearchCell(steps, multiplier, *channels, self.primitives, k) for channels in plan)
        self.classifier = nn.Linear(C_out, num_classes)
        n_edges, n_ops = sum(2 + i for i in range(steps)), len(self.primitives)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
        self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))

    ARCH_NAMES = ('alphas_normal', 'alphas_reduce', 'betas_normal', 'betas_reduce')

    def arch_parameters(self):
        return [getattr(self, n) for n in self.ARCH_NAMES]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if n not in self.ARCH_NAMES]

    def op_weights(self, alphas):
        """(n_edges, n_ops) op weights from alphas: sigmoid (Fair-DARTS), softmax, or sparsemax(alpha / tau)."""
        if self.weighting == 'sigmoid':
            return torch.sigmoid(alphas)
        if self.weighting == 'softmax':
            return F.softmax(alphas, dim=-1)
        return sparsemax(alphas / self.tau, dim=-1)

    def edge_weights(self, betas):
        """(n_edges,) edge weights sigmoid(beta), or ones when edge weights are off."""
        return torch.sigmoid(betas) if self.use_edge_weights else torch.ones_like(betas)

    def forward(self, x):
        # x (N, 1, S, S, S) -> logits (N, num_classes) in fp32
        w_normal, w_reduce = self.op_weights(self.alphas_normal), self.op_weights(self.alphas_reduce)
        e_normal, e_reduce = self.edge_weights(self.betas_normal), self.edge_weights(self.betas_reduce)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            s0 = s1 = self.stem(x)
            for cell in self.cells:
                w, e = (w_reduce, e_reduce) if cell.reduction else (w_normal, e_normal)
                s0, s1 = s1, cell(s0, s1, w, e)
            logits = self.classifier(F.adaptive_avg_pool3d(s1, 1).flatten(1))
        return logits.float() if self.amp else logits

    @torch.no_grad()
    def edge_op_weights(self):
        """{'normal': (n_edges, n_ops), 'reduce': ...}: W = op weight * edge weight, as used for the genotype."""
        return {cell: (self.op_weights(getattr(self, f'alphas_{cell}'))
                       * self.edge_weights(getattr(self, f'betas_{cell}'))[:, None]).cpu()
                for cell in ('normal', 'reduce')}

    def genotype(self):
        w = self.edge_op_weights()
        concat = list(range(2 + self.steps - self.multiplier, self.steps + 2))
        return Genotype(normal=derive_cell(w['normal'].numpy(), self.primitives, self.steps), normal_concat=concat,
                        reduce=derive_cell(w['reduce'].numpy(), self.primitives, self.steps), reduce_concat=concat)


def zero_one_loss(model, kind):
    """Pushes sigmoid(alpha) and sigmoid(beta) towards 0 or 1: 'l2' 0.25 - mean((s-0.5)^2), 'l1' -mean|s-0.5|."""
    if kind == 'off':
        return torch.zeros((), device=model.arch_parameters()[0].device)
    s = torch.cat([torch.sigmoid(p).flatten() for p in model.arch_parameters()])
    if kind == 'l2':
        return 0.25 - ((s - 0.5) ** 2).mean()
    if kind == 'l1':
        return -(s - 0.5).abs().mean()
    raise UserError(f'unknown zero-one loss {kind!r} (known: l2, l1, off)')
