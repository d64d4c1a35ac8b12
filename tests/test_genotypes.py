"""MRFC, genotype derivation from hand-made weights, the registry and genotype json files."""
import json

import numpy as np
import pytest

from genotypes import (
    DARTS_BASE_PRIMITIVES,
    GENOTYPES,
    NAS_HBO_PAPER,
    PRIMITIVES,
    Genotype,
    derive_cell,
    genotype_from_dict,
    genotype_to_dict,
    get_genotype,
    mrfc,
    receptive_field,
    save_genotype,
)
from utils import UserError


def test_mrfc_default_gives_paper_primitives():
    assert mrfc() == PRIMITIVES
    assert mrfc(DARTS_BASE_PRIMITIVES, (3, 6)) == PRIMITIVES
    assert len(PRIMITIVES) == 9 and 'none' not in PRIMITIVES


def test_mrfc_follows_smallest_conv_field_and_expansions():
    base = ['skip_connect', 'sep_conv_5x5x5', 'dil_conv_5x5x5', 'max_pool_3x3x3']
    assert mrfc(base, expansions=(4,)) == ['MBConv_9x9x9_4'] + base
    with pytest.raises(UserError):
        mrfc(['none', 'skip_connect', 'max_pool_3x3x3'])


@pytest.mark.parametrize('name, field', [
    ('sep_conv_3x3x3', 5), ('sep_conv_5x5x5', 9), ('dil_conv_3x3x3', 5), ('dil_conv_5x5x5', 9),
    ('MBConv_5x5x5_3', 5), ('MBConv_7x7x7_6', 7), ('max_pool_3x3x3', 3), ('avg_pool_3x3x3', 3),
    ('skip_connect', 1), ('none', 0)])
def test_receptive_field(name, field):
    assert receptive_field(name) == field


def test_receptive_field_unknown_op():
    with pytest.raises(UserError):
        receptive_field('conv_3x3x3')


def edge_index(node, src):
    """Row of edge src -> node in the (14, n_ops) weight array."""
    return sum(2 + i for i in range(node)) + src


def test_derive_cell_hand_made():
    w = np.full((14, len(PRIMITIVES)), 0.1)
    # node 0: strongest edge from 1 (sep_conv_3x3x3), then from 0 (max_pool)
    w[edge_index(0, 1), PRIMITIVES.index('sep_conv_3x3x3')] = 0.9
    w[edge_index(0, 0), PRIMITIVES.index('max_pool_3x3x3')] = 0.8
    # node 1: edges from 2 and 0; edge from 1 is weaker
    w[edge_index(1, 2), PRIMITIVES.index('MBConv_5x5x5_6')] = 0.7
    w[edge_index(1, 0), PRIMITIVES.index('skip_connect')] = 0.6
    w[edge_index(1, 1), PRIMITIVES.index('dil_conv_5x5x5')] = 0.5
    # node 2: edges from 3 and 2
    w[edge_index(2, 2), PRIMITIVES.index('avg_pool_3x3x3')] = 0.95
    w[edge_index(2, 3), PRIMITIVES.index('dil_conv_3x3x3')] = 0.99
    # node 3: edges from 4 and 1
    w[edge_index(3, 4), PRIMITIVES.index('MBConv_5x5x5_3')] = 0.5
    w[edge_index(3, 1), PRIMITIVES.index('sep_conv_5x5x5')] = 0.4
    assert derive_cell(w.tolist(), PRIMITIVES) == [
        ('sep_conv_3x3x3', 1), ('max_pool_3x3x3', 0),
        ('MBConv_5x5x5_6', 2), ('skip_connect', 0),
        ('dil_conv_3x3x3', 3), ('avg_pool_3x3x3', 2),
        ('MBConv_5x5x5_3', 4), ('sep_conv_5x5x5', 1)]


def test_derive_cell_ignores_none():
    prims = DARTS_BASE_PRIMITIVES
    w = np.full((14, len(prims)), 0.1)
    w[:, prims.index('none')] = 1.0                  # 'none' dominates everywhere but never counts
    w[edge_index(0, 0), prims.index('sep_conv_3x3x3')] = 0.3
    w[edge_index(0, 1), prims.index('dil_conv_3x3x3')] = 0.2
    gene = derive_cell(w, prims)
    assert len(gene) == 8 and all(op != 'none' for op, _ in gene)
    assert gene[:2] == [('sep_conv_3x3x3', 0), ('dil_conv_3x3x3', 1)]


def test_derive_cell_steps_and_shape_check():
    assert len(derive_cell(np.random.rand(5, 3), ['a', 'b', 'c'], steps=2)) == 4
    with pytest.raises(ValueError):
        derive_cell(np.zeros((13, len(PRIMITIVES))), PRIMITIVES)


def test_registry():
    assert get_genotype('NAS_HBO_PAPER') is NAS_HBO_PAPER
    assert GENOTYPES['NAS_HBO_PAPER'] is NAS_HBO_PAPER
    with pytest.raises(UserError) as err:
        get_genotype('DARTS_V9')
    assert 'DARTS_V9' in str(err.value) and 'NAS_HBO_PAPER' in str(err.value)


def test_paper_genotype_uses_primitives():
    for op, _ in NAS_HBO_PAPER.normal + NAS_HBO_PAPER.reduce:
        assert op in PRIMITIVES
    assert list(NAS_HBO_PAPER.normal_concat) == list(NAS_HBO_PAPER.reduce_concat) == [2, 3, 4, 5]


def test_json_round_trip(tmp_path):
    path = tmp_path / 'genotype.json'
    save_genotype(NAS_HBO_PAPER, path)
    assert [p.name for p in tmp_path.iterdir()] == ['genotype.json']   # no temp file left
    loaded = get_genotype(path)
    assert loaded == NAS_HBO_PAPER and isinstance(loaded, Genotype)
    assert get_genotype(str(path)) == NAS_HBO_PAPER
    assert genotype_from_dict(genotype_to_dict(NAS_HBO_PAPER)) == NAS_HBO_PAPER


def write_json(tmp_path, d):
    path = tmp_path / 'g.json'
    path.write_text(d if isinstance(d, str) else json.dumps(d))
    return path


@pytest.mark.parametrize('edit, message', [
    (lambda d: d['normal'].__setitem__(0, ['conv_9x9x9', 0]), 'conv_9x9x9'),
    (lambda d: d['reduce'].__setitem__(1, ['skip_connect', 2]), 'input 2'),
    (lambda d: d.pop('reduce_concat'), 'keys'),
    (lambda d: d.__setitem__('normal_concat', [2, 9]), 'normal_concat'),
    (lambda d: d['normal'].pop(), 'normal'),
])
def test_bad_genotype_file_names_file(tmp_path, edit, message):
    d = genotype_to_dict(NAS_HBO_PAPER)
    edit(d)
    path = write_json(tmp_path, d)
    with pytest.raises(UserError) as err:
        get_genotype(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_malformed_json_and_missing_file(tmp_path):
    path = write_json(tmp_path, '{"normal": [')
    with pytest.raises(UserError) as err:
        get_genotype(path)
    assert str(path) in str(err.value)
    missing = tmp_path / 'nope.json'
    with pytest.raises(UserError) as err:
        get_genotype(missing)
    assert str(missing) in str(err.value)
