"""bf16 autocast (AMP setting): convolutions in bf16, logits, losses and the search's HVP in fp32."""
import torch

import train_3D_continuation
import train_search
from architect import Architect
from genotypes import NAS_HBO_PAPER
from model import NetworkLUNA
from model_search import SearchNetwork

PRIMS = ['sep_conv_3x3x3', 'max_pool_3x3x3', 'skip_connect']


def conv_dtypes(model, x):
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    out = model(x)
    for h in hooks:
        h.remove()
    return out, set(seen)


def test_autocast_runs_convolutions_in_bf16_and_returns_fp32_logits():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    for model in (SearchNetwork(8, 2, 3, PRIMS), NetworkLUNA(4, 2, 3, NAS_HBO_PAPER)):
        out, dtypes = conv_dtypes(model, x)
        assert dtypes == {torch.float32}
        model.amp = True
        out, dtypes = conv_dtypes(model, x)
        assert dtypes == {torch.bfloat16} and out.dtype == torch.float32
        out.sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_second_order_step_takes_the_hvp_in_full_precision():
    torch.manual_seed(0)
    net = SearchNetwork(8, 2, 3, PRIMS)
    net.amp = True
    w_opt = torch.optim.SGD(net.weight_parameters(), 0.1, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), 6e-4)
    arch = Architect(net, w_opt, a_opt, 'second')
    modes = []
    net.register_forward_pre_hook(lambda m, i: modes.append(m.amp))
    x, y = torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1])
    arch.step(x, y, x, y, 0.1)
    # virtual step and validation at w' under autocast; the two finite-difference passes in fp32
    assert modes == [True, True, False, False] and net.amp


def test_scripts_run_with_amp(cube_set, tmp_path):
    tiny = dict(DATA=cube_set, RUNS=str(tmp_path), DEVICE='cpu', AMP=True, C=4, LAYERS=3, CUBE=16, EPOCHS=1,
                BATCH_SIZE=4)
    out = train_search.main(**tiny, PRIMITIVES=tuple(PRIMS), WARMUP_EPOCHS=0, SEARCH_FOLDS=(0, 1))
    assert out['epochs_done'] == 1
    res = train_3D_continuation.main(**tiny, FOLD=9, TRAIN_FOLDS=(0, 1))
    assert 0 <= res['folds'][0]['acc'] <= 100
