"""Genotypes: candidate op lists, MRFC, genotype derivation, named genotypes and their json files."""
import json
import re
from collections import namedtuple
from pathlib import Path

import numpy as np

from operations import check_op_name, parse_mbconv
from utils import UserError, atomic_path

# normal / reduce: list of (op_name, input_state_index), two per intermediate node;
# *_concat: indices of the states concatenated into the cell output.
Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

# The base DARTS candidate set, in 3D.
DARTS_BASE_PRIMITIVES = [
    'none',
    'max_pool_3x3x3',
    'avg_pool_3x3x3',
    'skip_connect',
    'sep_conv_3x3x3',
    'sep_conv_5x5x5',
    'dil_conv_3x3x3',
    'dil_conv_5x5x5',
]

# The paper's 9 candidates, in this fixed order (the column order of the alphas); equals mrfc().
PRIMITIVES = [
    'MBConv_5x5x5_3',
    'MBConv_5x5x5_6',
    'max_pool_3x3x3',
    'avg_pool_3x3x3',
    'skip_connect',
    'sep_conv_3x3x3',
    'sep_conv_5x5x5',
    'dil_conv_3x3x3',
    'dil_conv_5x5x5',
]

_CONV_PATTERN = re.compile(r'(sep|dil)_conv_(\d+)x\2x\2')


def receptive_field(name):
    """Receptive field of one candidate op along one axis, in voxels (0 for 'none')."""
    fixed = {'none': 0, 'skip_connect': 1, 'max_pool_3x3x3': 3, 'avg_pool_3x3x3': 3}
    if name in fixed:
        return fixed[name]
    m = _CONV_PATTERN.fullmatch(name)
    if m is not None:
        # sep_conv: two stacked k-convs -> 2k-1; dil_conv: one k-conv, dilation 2 -> 2(k-1)+1.
        return 2 * int(m.group(2)) - 1
    check_op_name(name)
    return parse_mbconv(name)[0]                        # every other known name is handled above


def mrfc(base=DARTS_BASE_PRIMITIVES, expansions=(3, 6)):
    """Maintaining receptive field criterion (MRFC) applied to a base candidate set.

    The paper states the criterion without a formula; this is our interpretation (DESIGN.md 1):
    'none' is dropped; MBConv candidates are added whose kernel equals the smallest receptive
    field among the stacked / dilated conv candidates (sep_conv k and dil_conv k both see 2k-1
    voxels per axis, so 5 for the 3x3x3 ones), so that the new ops keep the receptive field the
    cheap factorized convs already reach, one MBConv per expansion ratio, placed first.
    Applied to DARTS_BASE_PRIMITIVES with (3, 6) this gives exactly PRIMITIVES.
    """
    candidates = [name for name in base if name != 'none']
    conv_fields = [receptive_field(n) for n in candidates if _CONV_PATTERN.fullmatch(n)]
    if not conv_fields:
        raise UserError(f'MRFC: base set {list(base)} has no sep_conv / dil_conv candidate')
    k = min(conv_fields)
    added = [f'MBConv_{k}x{k}x{k}_{e}' for e in expansions]
    return added + [name for name in candidates if name not in added]


def derive_cell(weights, primitives, steps=4):
    """Discretize one cell from its edge-op weights.

    weights: (2+3+...+(steps+1), n_ops) array-like, W[edge, op] = sigmoid(alpha) * sigmoid(beta_edge);
    edges are ordered node by node, node i having 2+i incoming edges from states 0..i+1.
    For each node keep the 2 incoming edges with the largest max-over-ops weight and, per edge,
    the argmax op ('none' is never chosen). Edges are listed strongest first within a node;
    ties go to the lower index. Returns [(op_name, input_index)] * (2*steps).
    """
    w = np.asarray(weights, dtype=np.float64)
    n_edges = sum(2 + i for i in range(steps))
    if w.shape != (n_edges, len(primitives)):
        raise ValueError(f'weights shape {w.shape} != ({n_edges}, {len(primitives)})')
    w = w.copy()
    if 'none' in primitives:
        w[:, list(primitives).index('none')] = -np.inf
    gene, start = [], 0
    for i in range(steps):
        node_w = w[start:start + 2 + i]                 # (2+i, n_ops)
        order = np.argsort(-node_w.max(axis=1), kind='stable')[:2]
        for j in order:
            gene.append((primitives[int(np.argmax(node_w[j]))], int(j)))
        start += 2 + i
    return gene


_CONCAT = list(range(2, 6))

# The genotype published with the paper (DESIGN.md 1).
NAS_HBO_PAPER = Genotype(
    normal=[('dil_conv_5x5x5', 0), ('MBConv_5x5x5_3', 1), ('dil_conv_5x5x5', 0),
            ('MBConv_5x5x5_3', 2), ('MBConv_5x5x5_6', 2), ('MBConv_5x5x5_6', 3),
            ('dil_conv_3x3x3', 0), ('dil_conv_3x3x3', 4)],
    normal_concat=_CONCAT,
    reduce=[('skip_connect', 1), ('MBConv_5x5x5_6', 0), ('skip_connect', 1),
            ('MBConv_5x5x5_3', 0), ('dil_conv_3x3x3', 3), ('skip_connect', 2),
            ('sep_conv_3x3x3', 4), ('dil_conv_3x3x3', 3)],
    reduce_concat=_CONCAT,
)

GENOTYPES = {'NAS_HBO_PAPER': NAS_HBO_PAPER}


def genotype_to_dict(genotype):
    """json-ready dict: ops as [name, index] lists, concat as lists of ints."""
    return {
        'normal': [[op, int(j)] for op, j in genotype.normal],
        'normal_concat': [int(i) for i in genotype.normal_concat],
        'reduce': [[op, int(j)] for op, j in genotype.reduce],
        'reduce_concat': [int(i) for i in genotype.reduce_concat],
    }


def _cell_from_list(entries, key):
    """Validate one cell's [[op, input], ...] and return it as a list of tuples."""
    if not isinstance(entries, list) or not entries or len(entries) % 2:
        raise UserError(f"'{key}' must be a non-empty list with two [op, input] pairs per node")
    cell = []
    for n, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise UserError(f"'{key}' entry {n}: expected [op_name, input_index], got {entry!r}")
        op, j = entry
        try:
            check_op_name(op)
        except UserError as e:
            raise UserError(f"'{key}' entry {n}: {e}") from None
        if not 0 <= j <= n // 2 + 1:
            raise UserError(f"'{key}' entry {n}: input {j} is not an earlier state of node {n // 2}")
        cell.append((op, j))
    return cell


def _concat_from_list(values, key, n_states):
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, int) and 2 <= v < n_states for v in values)):
        raise UserError(f"'{key}' must be a non-empty list of node indices in 2..{n_states - 1}")
    return list(values)


def genotype_from_dict(d):
    """Inverse of genotype_to_dict; raises UserError describing what is malformed."""
    if not isinstance(d, dict) or set(Genotype._fields) - set(d):
        raise UserError(f'a genotype needs the keys {list(Genotype._fields)}')
    normal = _cell_from_list(d['normal'], 'normal')
    reduce = _cell_from_list(d['reduce'], 'reduce')
    return Genotype(
        normal=normal,
        normal_concat=_concat_from_list(d['normal_concat'], 'normal_concat', len(normal) // 2 + 2),
        reduce=reduce,
        reduce_concat=_concat_from_list(d['reduce_concat'], 'reduce_concat', len(reduce) // 2 + 2),
    )


def load_genotype(path):
    """Read a genotype.json; any problem raises UserError naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return genotype_from_dict(d)
    except (OSError, ValueError) as e:
        raise UserError(f'genotype file {path}: cannot read json ({e})') from e
    except UserError as e:
        raise UserError(f'genotype file {path}: {e}') from e


def get_genotype(name_or_path):
    """A registered genotype by name, or the genotype stored in a .json file."""
    key = str(name_or_path)
    if key in GENOTYPES:
        return GENOTYPES[key]
    if key.endswith('.json') or Path(key).is_file():
        return load_genotype(key)
    raise UserError(f"unknown genotype '{key}': give a genotype.json path or one of "
                    f"{', '.join(sorted(GENOTYPES))}")


def save_genotype(genotype, path):
    """Write the genotype as json atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(genotype_to_dict(genotype), f, indent=2)
        f.write('\n')
