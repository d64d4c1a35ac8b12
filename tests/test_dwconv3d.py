"""Depthwise 3D convolution (dwconv3d.py) against torch's conv3d(groups=C).

The Triton kernels are checked on CPU in Triton's interpreter. triton reads TRITON_INTERPRET when it is
first imported (its own library functions are jitted then), so the kernels run in child processes
started with the variable set: this holds whatever the rest of the session has imported. The parent
builds the inputs and float64 references; the children (this file run as a script) only call the
launchers. Two children share the cases, one per core.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dwconv3d
from dwconv3d import DepthwiseConv3d

HAVE_TRITON = importlib.util.find_spec('triton') is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (N, C, (D, H, W), kernel, dilation, stride, dtype). Every kernel x dilation x stride in fp32,
# odd, even and mixed sizes, 1-3 channels; bf16 on a few; 'blocks' spans 2 hw blocks and 2 depth blocks;
# 'tiny' is smaller than the kernel (and W = 1 leaves a stride-2 parity class empty).
CASES = {
    'k3d1s1': (1, 3, (5, 5, 5), 3, 1, 1, torch.float32),
    'k3d1s2': (2, 1, (7, 6, 5), 3, 1, 2, torch.float32),
    'k3d2s1': (1, 2, (8, 8, 8), 3, 2, 1, torch.float32),
    'k3d2s2': (1, 2, (7, 6, 5), 3, 2, 2, torch.float32),
    'k5d1s1': (1, 2, (5, 5, 5), 5, 1, 1, torch.float32),
    'k5d1s2': (1, 1, (8, 8, 8), 5, 1, 2, torch.float32),
    'k5d2s1': (1, 1, (7, 6, 5), 5, 2, 1, torch.float32),
    'k5d2s2': (1, 3, (5, 5, 5), 5, 2, 2, torch.float32),
    'blocks': (2, 1, (18, 17, 16), 3, 1, 1, torch.float32),
    'tiny': (1, 2, (2, 3, 1), 5, 2, 2, torch.float32),
    'bf16_k3d1s2': (1, 3, (6, 5, 7), 3, 1, 2, torch.bfloat16),
    'bf16_k5d2s1': (1, 2, (5, 5, 5), 5, 2, 1, torch.bfloat16),
}
GRAD_WEIGHT_SPLIT = 2  # grad-weight programs per (channel, kernel row) in the children: most loop over tiles


def _inputs(name):
    n, c, size, k, _, _, dtype = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn((n, c) + size, generator=g).to(dtype)
    w = torch.randn((c, 1, k, k, k), generator=g).to(dtype)
    return x, w


def _reference(name, x, w):
    """float64 output and gradients (for gy = a fixed random tensor) of conv3d(groups=C)."""
    _, c, _, k, dil, stride, _ = CASES[name]
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y = F.conv3d(x64, w64, stride=stride, padding=dil * (k - 1) // 2, dilation=dil, groups=c)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    gx, gw = torch.autograd.grad(y, (x64, w64), gy.double())
    return gy, y.detach(), gx, gw


def _run_child(names, path):
    """Run the launchers on the saved inputs of `names` (in this process; TRITON_INTERPRET must be set)."""
    data = torch.load(path)
    out = {}
    for name in names:
        x, w, gy = data[name]
        _, _, _, k, dil, stride, _ = CASES[name]
        out[name] = (dwconv3d.dwconv3d_forward(x, w, stride, dil),
                     dwconv3d.dwconv3d_grad_input(gy, w, x.shape, stride, dil),
                     dwconv3d.dwconv3d_grad_weight(x, gy, k, stride, dil, split=GRAD_WEIGHT_SPLIT))
    torch.save(out, path + '.out')


@pytest.fixture(scope='module')
def interpreter_results(tmp_path_factory):
    """{name: ((y, gx, gw) from the kernels, (y, gx, gw) float64 references)} for all CASES."""
    folder = tmp_path_factory.mktemp('dwconv3d')
    names = list(CASES)
    refs, children = {}, []
    for part, chunk in enumerate((names[0::2], names[1::2])):
        data = {}
        for name in chunk:
            x, w = _inputs(name)
            gy, *refs[name] = _reference(name, x, w)
            data[name] = (x, w, gy)
        path = str(folder / f'part{part}.pt')
        torch.save(data, path)
        env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get('PYTHONPATH')))))  # (a side-folder triton)
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), path] + chunk, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for child in children:
        log, _ = child.communicate(timeout=600)
        assert child.returncode == 0, log[-3000:]
    for part in range(2):
        results.update(torch.load(str(folder / f'part{part}.pt.out')))
    return {name: (results[name], refs[name]) for name in names}


@pytest.mark.skipif(not HAVE_TRITON, reason='triton is not installed')
@pytest.mark.parametrize('name', list(CASES))
def test_kernels_match_conv3d(interpreter_results, name):
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = interpreter_results[name]
    x, w = _inputs(name)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert gw.shape == w.shape and gw.dtype == torch.float32
    # Relative to the largest value. bf16 outputs are rounded to 8 bits; grad-weight stays fp32 from
    # exact bf16 products, so it keeps the fp32 tolerance.
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    for got, ref, t in ((y, y_ref, tol), (gx, gx_ref, tol), (gw, gw_ref, 1e-5)):
        err = (got.double() - ref).abs().max().item()
        assert err <= t * max(ref.abs().max().item(), 1.0), (name, err)


def _plan_uses(planes):
    """[(z, row, kd)] from _plan's flat PLANES tuples (z, row, kd, row, kd, ...)."""
    assert all(isinstance(v, int) for plane in planes for v in plane)  # two levels deep at most (triton 3.6)
    return [(plane[0], r, kd) for plane in planes for r, kd in zip(plane[1::2], plane[2::2])]


def _plan_taps(htaps, wtaps):
    """{(kh, kw): (h offset, w offset)} spelled out from _plan's HTAPS progression and WTAPS."""
    kh0, kh_step, count, oh0, oh_step = htaps
    return {(kh0 + i * kh_step, kw): (oh0 + i * oh_step, ow) for i in range(count) for kw, ow in wtaps}


@pytest.mark.parametrize('k, stride, dilation', [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 1, 2)])
def test_plan_forward_reads_every_tap_and_plane_once(k, stride, dilation):
    pad, rows = dilation * (k - 1) // 2, 4
    htaps, wtaps, planes = dwconv3d._plan(k, stride, dilation, rows)
    assert _plan_taps(htaps, wtaps) == {(kh, kw): (kh * dilation - pad, kw * dilation - pad)
                                        for kh in range(k) for kw in range(k)}
    uses = _plan_uses(planes)
    assert sorted((r, kd) for _, r, kd in uses) == [(r, kd) for r in range(rows) for kd in range(k)]
    assert all(z == r * stride + kd * dilation - pad for z, r, kd in uses)
    assert len({plane[0] for plane in planes}) == len(planes)


@pytest.mark.parametrize('k, stride, dilation', [(3, 1, 1), (5, 1, 2), (5, 2, 1), (3, 2, 2), (5, 2, 2)])
def test_plan_transposed_parity_classes_partition_the_taps(k, stride, dilation):
    # Input voxel i = a*stride + p receives tap j from output (i + pad - j*dilation) / stride when exact.
    pad, rows = dilation * (k - 1) // 2, 3
    seen = []
    for p in range(stride):
        htaps, wtaps, planes = dwconv3d._plan(k, stride, dilation, rows, transposed=True, parity=(p, p, 0))
        expect = {j: (p + pad - j * dilation) // stride for j in range(k) if (p + pad - j * dilation) % stride == 0}
        taps = _plan_taps(htaps, wtaps)
        assert {kh: oh for (kh, _), (oh, _) in taps.items()} == expect
        uses = _plan_uses(planes)
        assert sorted((r, kd) for _, r, kd in uses) == [(r, j) for r in range(rows) for j in sorted(expect)]
        assert all(z == r + expect[kd] for z, r, kd in uses)
        seen.append({kh for kh, _ in taps})
    assert sorted(kh for kernel_rows in seen for kh in kernel_rows) == list(range(k))  # disjoint, complete


def test_module_on_cpu_is_nn_conv3d():
    torch.manual_seed(0)
    m = DepthwiseConv3d(5, 3, stride=2, padding=2, dilation=2)
    assert m.weight.shape == (5, 1, 3, 3, 3) and m.bias is None
    ref = nn.Conv3d(5, 5, 3, stride=2, padding=2, dilation=2, groups=5, bias=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 6, 7, 5)
    assert torch.equal(m(x), ref(x))


def test_set_fast_kernels():
    try:
        dwconv3d.set_fast_kernels(False)
        assert dwconv3d.FAST_KERNELS is False
    finally:
        dwconv3d.set_fast_kernels(True)
    assert dwconv3d.FAST_KERNELS is True


def test_imports_and_falls_back_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, 'triton', None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, 'triton.language', None)
    spec = importlib.util.spec_from_file_location('dwconv3d_no_triton', os.path.join(REPO, 'dwconv3d.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    m = module.DepthwiseConv3d(2, 3, padding=1)
    x = torch.randn(1, 2, 4, 4, 4)
    assert torch.equal(m(x), F.conv3d(x, m.weight, padding=1, groups=2))
    with pytest.raises(RuntimeError, match='triton is not installed'):
        module.dwconv3d_forward(x, m.weight)


@pytest.mark.skipif(not HAVE_TRITON, reason='triton is not installed')
def test_launchers_reject_bad_input():
    x = torch.randn(1, 2, 4, 4, 4, device='cuda' if torch.cuda.is_available() else 'cpu')
    if not (x.is_cuda or dwconv3d.interpreted()):
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
            dwconv3d.dwconv3d_forward(x, torch.randn(2, 1, 3, 3, 3))
        return
    with pytest.raises(ValueError, match='unsupported kernel 7'):
        dwconv3d.dwconv3d_forward(x, torch.randn(2, 1, 7, 7, 7, device=x.device))
    with pytest.raises(ValueError, match='weight'):
        dwconv3d.dwconv3d_forward(x, torch.randn(3, 1, 3, 3, 3, device=x.device))


CUDA_CONFIGS = [(3, 1, 1), (3, 2, 2), (5, 1, 2), (5, 2, 1)]  # (kernel, stride, dilation)


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason='needs CUDA and triton')
@pytest.mark.parametrize('k, stride, dilation', CUDA_CONFIGS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cuda_module_matches_nn_conv3d(k, stride, dilation, dtype):
    torch.manual_seed(0)
    c, pad = 6, dilation * (k - 1) // 2
    m = DepthwiseConv3d(c, k, stride, pad, dilation).cuda().to(dtype)
    ref = nn.Conv3d(c, c, k, stride, pad, dilation, groups=c, bias=False).cuda().to(dtype)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, c, 16, 13, 9, device='cuda', dtype=dtype)
    assert m._fast_dtype(x) == dtype
    outs = []
    for module in (m, m, ref.float()):  # m twice (the second call reuses the compiled kernels); the reference
        module.zero_grad()  # in fp32 on the same (bf16-valued) inputs
        xi = x.clone().to(module.weight.dtype).requires_grad_()
        y = module(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), device='cuda').to(dtype).to(y.dtype).view_as(y))
        outs.append((y.float(), xi.grad.float(), module.weight.grad.float()))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    # fp32 accumulation: bf16 results are off by their own rounding only (2^-8 relative)
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    for name, got, want in zip(('output', 'grad_input', 'grad_weight'), outs[0], outs[2]):
        err = (got - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), (name, err)


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason='needs CUDA and triton')
def test_cuda_autocast_and_switch():
    m = DepthwiseConv3d(4, 5, padding=2).cuda()
    x = torch.randn(2, 4, 8, 8, 8, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert m._fast_dtype(x) == torch.bfloat16
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32
    try:
        dwconv3d.set_fast_kernels(False)
        assert m._fast_dtype(x) is None
        with torch.autocast('cuda', dtype=torch.bfloat16):
            torch.testing.assert_close(m(x).float(), y.float(), rtol=3e-2, atol=3e-2)
    finally:
        dwconv3d.set_fast_kernels(True)


if __name__ == '__main__':
    _run_child(sys.argv[2:], sys.argv[1])


class _FakeCompiled:
    """Stands in for Triton's compiled kernel: compiled[grid](*args, stream=...) launches."""
    function = 'handle'

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, stream: self.log.append(('reused', grid, args, stream))


class _FakeKernel:
    """Stands in for a @triton.jit function: kernel[grid](*args, **constants, **options) compiles and runs."""
    __name__ = 'fake'
    arg_names = ['x', 'n', 'A', 'B']

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, num_warps, enable_fp_fusion, **consts):
            self.log.append(('jit', grid, args, consts))
            return _FakeCompiled(self.log)
        return run


def test_launch_reuses_the_compiled_kernel_only_for_the_same_specialization(monkeypatch):
    monkeypatch.setattr(dwconv3d, 'interpreted', lambda: False)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device: type('S', (), {'cuda_stream': 7}))
    monkeypatch.setattr(dwconv3d, '_COMPILED', {})
    kernel, x = _FakeKernel(), torch.zeros(64)

    def calls(*args, **consts):
        dwconv3d._launch(kernel, (2, 1, 1), args, 4, **consts)
        return kernel.log[-1][0]

    assert calls(x, 32, B=(1, 2), A=3) == 'jit'
    assert calls(x, 32, B=(1, 2), A=3) == 'reused'
    assert kernel.log[-1] == ('reused', (2, 1, 1), (x, 32, 3, (1, 2)), 7)  # constants in signature order
    assert calls(x, 48, B=(1, 2), A=3) == 'reused'  # 48 is specialized like 32 (divisible by 16)
    assert calls(x, 33, B=(1, 2), A=3) == 'jit'  # not divisible by 16
    assert calls(x, 1, B=(1, 2), A=3) == 'jit'  # the value 1
    assert calls(x, 2 ** 31, B=(1, 2), A=3) == 'jit'  # 64-bit
    assert calls(x[1:], 32, B=(1, 2), A=3) == 'jit'  # 4-byte aligned only
    assert calls(x.double(), 32, B=(1, 2), A=3) == 'jit'  # dtype
    assert calls(x, 32, B=(1, 3), A=3) == 'jit'  # a constant
    assert calls(x, 32, B=(1, 3), A=3) == 'reused'


@pytest.mark.skipif(not HAVE_TRITON, reason='triton is not installed')
@pytest.mark.parametrize('k, stride, dilation, dtype', [(5, 2, 1, torch.float32), (3, 1, 2, torch.bfloat16)])
def test_kernels_compile_for_sm90(monkeypatch, k, stride, dilation, dtype):
    """The interpreter does not run Triton's compiler: compile every launch of one convolution for an H100
    (no GPU needed) with the installed triton. Nested constexpr tuples, for one, failed only here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    launches = []
    monkeypatch.setattr(dwconv3d, 'interpreted', lambda: True)  # the launchers accept CPU tensors
    monkeypatch.setattr(dwconv3d, '_launch', lambda kernel, grid, args, warps, **consts:
                        launches.append((kernel, args, warps, consts)))
    x, w = torch.zeros(2, 3, 7, 6, 5, dtype=dtype), torch.zeros(3, 1, k, k, k, dtype=dtype)
    gy = torch.zeros(2, 3, *(dwconv3d._out_size(s, k, stride, dilation) for s in (7, 6, 5)), dtype=dtype)
    dwconv3d.dwconv3d_forward(x, w, stride, dilation)
    dwconv3d.dwconv3d_grad_input(gy, w, x.shape, stride, dilation)
    dwconv3d.dwconv3d_grad_weight(x, gy, k, stride, dilation)
    assert len(launches) == 2 + stride ** 3
    types = {torch.float32: '*fp32', torch.bfloat16: '*bf16'}
    for kernel, args, warps, consts in launches:
        signature = {name: types[a.dtype] if torch.is_tensor(a) else 'i32' for name, a in zip(kernel.arg_names, args)}
        signature.update({name: 'constexpr' for name in consts})
        compiled = dwconv3d.triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget('cuda', 90, 32),
                                           options={'num_warps': warps, 'enable_fp_fusion': True})
        assert compiled.asm['cubin']


def test_default_networks_compile_few_kernel_binaries():
    """The search supernet and the retrain network at the scripts' defaults (fp32) need at most 60 distinct Triton
    binaries: sizes and channel counts are runtime arguments, one tile per kernel (was 201 with sizes as constants;
    the parity classes of the stride-2 grad-input are most of what is left)."""
    from benchmarks import kernels
    calls = kernels.default_conv_calls()
    assert len(set(calls['search'])) > 50 and len(set(calls['retrain'])) > 10  # many layer shapes ...
    found = kernels.specializations(calls['search'] + calls['retrain'], (torch.float32,))
    assert 20 <= len(found) <= 60, len(found)  # ... few binaries
    assert {f[0] for f in found} == {'_gather_kernel', '_grad_weight_kernel'}


def test_first_compile_is_announced_once(monkeypatch, capsys):
    monkeypatch.setattr(dwconv3d, 'interpreted', lambda: False)
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device: type('S', (), {'cuda_stream': 7}))
    monkeypatch.setattr(dwconv3d, '_COMPILED', {})
    monkeypatch.setattr(dwconv3d, '_noticed', [])
    kernel, x = _FakeKernel(), torch.zeros(64)
    for size in (32, 32, 33):
        dwconv3d._launch(kernel, (2, 1, 1), (x, size), 4, B=(1, 2), A=3)
    assert capsys.readouterr().out.count('compiling the Triton depthwise kernels (first use') == 1
