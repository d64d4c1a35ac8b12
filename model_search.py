"""The search supernet: partial-channel mixed ops, cells with op weights alpha and edge weights beta."""
import torch
import torch.nn.functional as F
from torch import nn

from genotypes import Genotype, derive_cell
from operations import FactorizedReduce, ReLUConvBN, cell_layout, make_op, parse_mbconv, recomputed, stem
from sparsemax import sparsemax
from utils import UserError

WEIGHTINGS = ('sigmoid', 'softmax', 'sparsemax')


def channel_shuffle(x, groups):
    """(N, C, D, H, W) -> same shape, channels interleaved across `groups` groups."""
    n, c = x.shape[:2]
    return x.view(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


# How a batched op reads the state: 'x' the active channels, 'relu' their ReLU, 'rep' their ReLU repeated once
# per edge (edge-major channels). Ops whose first layer is that ReLU share it instead of each computing it.
def _batched_op(name, part, stride, edges, reduce_shift, mbconv_affine):
    """(module, input kind) of candidate `name` for `edges` edges at once: (N, part, ...) -> (N, edges * part, ...),
    edge e in channels [e*part, (e+1)*part), each edge with its own weights. reduce_shift, mbconv_affine: see
    SearchNetwork."""
    if name == 'skip_connect':  # stride 2 only: stride 1 is the identity, a shared op
        return FactorizedReduce(part, part, affine=False, edges=edges, relu=False, shift=reduce_shift), 'relu'
    if parse_mbconv(name) is not None:
        return make_op(name, part, stride, mbconv_affine, edges=edges), 'x'
    # sep_conv / dil_conv (ReLU, depthwise, pointwise, BN): the edges' copies as groups, on the shared ReLU
    return make_op(name, edges * part, stride, False, groups=edges, relu=False), 'rep'


class EdgeGroup(nn.Module):
    """The mixed ops of all edges leaving one state, computed together (partial channels, PC-DARTS).

    Every edge reads the same first C/k channels of the state, so the parameter-free candidates (pools + BN,
    identity) run once for all edges, and each candidate with weights runs its edges' copies side by side as
    one wider op. Edge e's op o equals make_op(o, C/k, stride) holding the e-th slice of the batched weights.
    'none' adds nothing and is not run.
    """

    def __init__(self, C, stride, primitives, k, edges, reduce_shift=False, mbconv_affine=True):
        super().__init__()
        self.part, self.stride, self.edges = C // k, stride, edges
        self.batched, self.shared = nn.ModuleList(), nn.ModuleList()
        self.batched_cols, self.shared_cols, self.kinds = [], [], []  # columns of the op weights, input kinds
        for col, name in enumerate(primitives):
            if name == 'none':
                continue
            if 'pool' in name:
                self.shared.append(nn.Sequential(make_op(name, self.part, stride, False),
                                                 nn.BatchNorm3d(self.part, affine=False)))
                self.shared_cols.append(col)
            elif name == 'skip_connect' and stride == 1:
                self.shared.append(nn.Identity())
                self.shared_cols.append(col)
            else:
                op, kind = _batched_op(name, self.part, stride, edges, reduce_shift, mbconv_affine)
                self.batched.append(op)
                self.batched_cols.append(col)
                self.kinds.append(kind)

    def forward(self, x, w_batched, w_shared):
        """x (N, C, D, H, W); w_batched (edges, n_batched), w_shared (edges, n_shared) op weights of the edges.

        Returns the edges' weighted op sums (N, edges, C/k, D', H', W') and the bypass channels (N, C - C/k,
        D', H', W'), 2x max-pooled when reducing (None when C/k == C).
        """
        n, m = x.shape[0], self.edges
        active = x[:, :self.part]
        inputs = {'x': active}
        if 'relu' in self.kinds or 'rep' in self.kinds:
            inputs['relu'] = F.relu(active)
        if 'rep' in self.kinds:
            inputs['rep'] = inputs['relu'].repeat(1, m, 1, 1, 1) if m > 1 else inputs['relu']
        mixed = None
        if self.batched:
            outs = [op(inputs[kind]) for op, kind in zip(self.batched, self.kinds)]
            size = outs[0].shape[2:]
            stacked = torch.stack([o.view(n * m, -1) for o in outs], dim=1)  # (N * edges, n_batched, P)
            w = w_batched.expand(n, m, len(outs)).reshape(n * m, 1, len(outs))
            mixed = torch.bmm(w, stacked).view(n, m, self.part, *size)
        if self.shared:
            stacked = torch.stack([op(active) for op in self.shared], dim=1)  # (N, n_shared, C/k, D', H', W')
            size = stacked.shape[3:]
            out = torch.bmm(w_shared.expand(n, m, len(self.shared)), stacked.view(n, len(self.shared), -1))
            out = out.view(n, m, self.part, *size)
            mixed = out if mixed is None else mixed + out
        bypass = x[:, self.part:]
        if bypass.shape[1] == 0:
            bypass = None
        elif self.stride == 2:
            bypass = F.max_pool3d(bypass, 2, 2)
        return mixed, bypass


def edge_index(i, j):
    """Row of the edge from state i into node j in the (n_edges, n_ops) weights (edges ordered node by node)."""
    return j * (j + 3) // 2 + i


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction, reduction_prev, primitives, k, reduce_shift=False,
                 mbconv_affine=True):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.k = k
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_pp, C, affine=False, shift=reduce_shift)
        else:
            self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        # State i feeds nodes max(0, i-1) .. steps-1; the last node feeds nothing.
        self.groups = nn.ModuleList(
            EdgeGroup(C, 2 if reduction and i < 2 else 1, primitives, k, steps - max(0, i - 1), reduce_shift,
                      mbconv_affine)
            for i in range(steps + 1))
        # One gather takes every group's (edges, n_batched) and (edges, n_shared) op weights from the flat
        # (n_edges * n_ops) weights.
        index, self.splits = [], []
        for i, group in enumerate(self.groups):
            rows = [edge_index(i, j) for j in range(max(0, i - 1), steps)]
            for cols in (group.batched_cols, group.shared_cols):
                index += [r * len(primitives) + c for r in rows for c in cols]
                self.splits.append(len(index) - sum(self.splits))
        self.register_buffer('weight_index', torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, s0, s1, weights, edge_weights):
        # weights (n_edges, n_ops), edge_weights (n_edges,); output (N, multiplier*C, ...)
        w = (weights * edge_weights[:, None]).flatten().index_select(0, self.weight_index).split(self.splits)
        betas = edge_weights.unbind()
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        mixed, bypass = [], []  # per state: its edges' op sums (unbound per edge) and its bypass channels
        for j in range(self.steps):
            for i in range(len(mixed), len(states)):
                group = self.groups[i]
                out, rest = group(states[i], w[2 * i].view(group.edges, len(group.batched_cols)),
                                  w[2 * i + 1].view(group.edges, len(group.shared_cols)))
                mixed.append(out.unbind(1))
                bypass.append(rest)
            # Node j: the sum over its incoming edges (i -> j) of beta_ij * shuffle(cat(op sum, bypass)).
            parts = [sum(mixed[i][j - max(0, i - 1)] for i in range(j + 2))]
            if bypass[0] is not None:
                parts.append(sum(betas[edge_index(i, j)] * bypass[i] for i in range(j + 2)))
            states.append(channel_shuffle(torch.cat(parts, dim=1), self.k))
        return torch.cat(states[-self.multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """DARTS-style supernet for (N, 1, S, S, S) cubes.

    Architecture parameters (nn.Parameters, so they live in state_dict and checkpoints):
    alphas_normal/alphas_reduce (n_edges, n_ops) op weights, betas_normal/betas_reduce (n_edges,) edge weights.
    The published NAS-HBO forms by default: reduce_shift=False (FactorizedReduce's two convs read the same
    voxels; True: DARTS' shifted second conv) and mbconv_affine=True (the MBConv candidates' BatchNorms learn a
    scale and shift, unlike the other candidates'; False: none learns one, as in DARTS).
    """

    def __init__(self, C, num_classes, layers, primitives, steps=4, multiplier=4, stem_multiplier=3, k=4,
                 weighting='sigmoid', edge_weights=True, reduce_shift=False, mbconv_affine=True):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise UserError(f'unknown op weighting {weighting!r} (known: {", ".join(WEIGHTINGS)})')
        if C % k or layers < 3:
            raise UserError(f'C={C} must be divisible by PC_K={k}, and LAYERS={layers} must be >= 3')
        if all(name == 'none' for name in primitives):
            raise UserError(f"PRIMITIVES {list(primitives)}: the supernet needs an op other than 'none'")
        self.primitives = list(primitives)
        self.steps, self.multiplier = steps, multiplier
        self.weighting = weighting
        self.use_edge_weights = edge_weights
        self.tau = 1.0  # sparsemax temperature, set per epoch by the search loop
        self.amp = False  # bf16 autocast in forward (logits returned in fp32)
        self.checkpoint_cells = False  # training forwards keep only the cells' inputs, recompute cells in backward
        self.stem = stem(stem_multiplier * C)
        plan, C_out = cell_layout(C, layers, multiplier, stem_multiplier)
        self.cells = nn.ModuleList(SearchCell(steps, multiplier, *channels, self.primitives, k, reduce_shift,
                                              mbconv_affine) for channels in plan)
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
            recompute = self.checkpoint_cells and self.training and torch.is_grad_enabled()
            for cell in self.cells:
                w, e = (w_reduce, e_reduce) if cell.reduction else (w_normal, e_normal)
                s0, s1 = s1, recomputed(cell, s0, s1, w, e) if recompute else cell(s0, s1, w, e)
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
