"""The retrain network: a stack of cells fixed by a genotype (no auxiliary head)."""
import torch
from torch import nn

from operations import FactorizedReduce, ReLUConvBN, cell_layout, make_op, recomputed, stem


def drop_path(x, drop_prob):
    """Zero whole samples with probability drop_prob and rescale the rest by 1/keep.
    x: (N, C, D, H, W); one uniform draw per sample, kept where it is below keep. drop_prob: a float, or a 0-dim
    tensor (graphs.py: a captured step reads it on the device; the same draws and values as the float)."""
    keep = 1.0 - drop_prob
    mask = torch.rand(x.shape[0], 1, 1, 1, 1, device=x.device) < keep
    return x * mask.to(x.dtype) / keep


class Cell(nn.Module):
    """One discrete cell. Inputs s0 (N, C_prev_prev, ...) and s1 (N, C_prev, ...) from the two
    previous cells; output (N, len(concat) * C, D', H', W'), D' = D/2 in a reduction cell."""

    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev, reduce_shift=False):
        super().__init__()
        # s0 comes from two cells back: if the previous cell reduced, it is twice as large.
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=True, shift=reduce_shift)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.reduction = reduction
        self.multiplier = len(self.concat)
        self.steps = len(edges) // 2
        # Only edges from the cell inputs (states 0, 1) change the resolution.
        self.ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and j < 2 else 1, affine=True, reduce_shift=reduce_shift)
            for name, j in edges)
        self.indices = [j for _, j in edges]

    def forward(self, s0, s1, drop_prob):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            node = 0
            for e in (2 * i, 2 * i + 1):
                op = self.ops[e]
                h = op(states[self.indices[e]])
                # a tensor probability is always applied (its value is not read on the host; 0 keeps every sample)
                if self.training and not isinstance(op, nn.Identity) and (torch.is_tensor(drop_prob) or drop_prob > 0):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class NetworkLUNA(nn.Module):
    """Stem, `layers` cells (reductions at layers//3 and 2*layers//3), global average pool, linear.
    (N, 1, D, H, W) -> (N, num_classes) logits; D, H, W divisible by 4 keep every shape exact.
    Set `model.drop_path_prob` per epoch; it acts only in training mode. With `model.checkpoint_cells` a
    training forward keeps only each cell's inputs for backward and recomputes the cell there (same values:
    same drop-path draws, BatchNorm statistics tracked once): less memory for about one more forward.
    reduce_shift: the FactorizedReduce form (operations.FactorizedReduce; False: the published NAS-HBO one)."""

    def __init__(self, C, num_classes, layers, genotype, drop_path_prob=0.0, stem_multiplier=3, reduce_shift=False):
        super().__init__()
        self.drop_path_prob = drop_path_prob
        self.amp = False  # bf16 autocast in forward (logits returned in fp32)
        self.checkpoint_cells = False
        self.stem = stem(stem_multiplier * C)
        plan, C_out = cell_layout(C, layers, (len(genotype.normal_concat), len(genotype.reduce_concat)),
                                  stem_multiplier)
        self.cells = nn.ModuleList(Cell(genotype, *channels, reduce_shift) for channels in plan)
        self.global_pooling = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(C_out, num_classes)

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            s0 = s1 = self.stem(x)
            recompute = self.checkpoint_cells and self.training and torch.is_grad_enabled()
            p = self.drop_path_prob
            for cell in self.cells:
                s0, s1 = s1, recomputed(cell, s0, s1, p) if recompute else cell(s0, s1, p)
            out = self.global_pooling(s1).flatten(1)            # (N, C_prev)
            logits = self.classifier(out)
        return logits.float() if self.amp else logits
