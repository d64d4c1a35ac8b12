"""Benchmark of the depthwise 3D convolution kernels (CUDA only): Triton (dwconv3d.py) against torch, at the
shapes the search and retrain networks use, and the host time per launch. Run through bench.py --BENCH=kernels."""
import contextlib
import time

import torch

import dwconv3d
import utils

# (where, N, C, input edge, kernel, stride, dilation). Derived from DESIGN.md section 1:
# retrain net (C=36, 20 cells, batch 4): 36 / 72 / 144 channels at 32^3 / 16^3 / 8^3 (reductions at
# cells 6 and 13, whose stride-2 ops read the larger input); MBConv hidden width = 3x or 6x.
# search supernet (C=16, 8 cells, batch 7, partial channels 1/4): 4 / 8 / 16 channels at 32^3 / 16^3 /
# 8^3, MBConv hidden 12-96. The paper genotype uses dil_conv 3/5, MBConv 5 (x3, x6) and sep_conv 3.
DWCONV_SHAPES = [
    ('retrain dil_conv_3x3x3', 4, 36, 32, 3, 1, 2),
    ('retrain dil_conv_5x5x5', 4, 36, 32, 5, 1, 2),
    ('retrain sep_conv_3x3x3', 4, 36, 32, 3, 1, 1),
    ('retrain MBConv_5_3', 4, 108, 32, 5, 1, 1),
    ('retrain MBConv_5_6', 4, 216, 32, 5, 1, 1),
    ('retrain MBConv_5_6 reduce', 4, 432, 32, 5, 2, 1),
    ('retrain dil_conv_3x3x3 reduce', 4, 72, 32, 3, 2, 2),
    ('retrain dil_conv_5x5x5 16^3', 4, 72, 16, 5, 1, 2),
    ('retrain MBConv_5_6 16^3', 4, 432, 16, 5, 1, 1),
    ('retrain MBConv_5_6 8^3', 4, 864, 8, 5, 1, 1),
    ('retrain dil_conv_3x3x3 8^3', 4, 144, 8, 3, 1, 2),
    ('search dil_conv_5x5x5', 7, 4, 32, 5, 1, 2),
    ('search MBConv_5_6', 7, 24, 32, 5, 1, 1),
    ('search sep_conv_5x5x5 reduce', 7, 8, 32, 5, 2, 1),
    ('search MBConv_5_6 16^3', 7, 48, 16, 5, 1, 1),
    ('search MBConv_5_6 8^3', 7, 96, 8, 5, 1, 1),
]


def _dwconv_passes(n, c, size, k, stride, dilation, device, dtype):
    """{pass: (triton fn, torch fn, bytes the pass must move)} for one depthwise conv shape."""
    pad = dilation * (k - 1) // 2
    x = torch.randn(n, c, size, size, size, device=device, dtype=dtype)
    w = torch.randn(c, 1, k, k, k, device=device, dtype=dtype)
    y = torch.nn.functional.conv3d(x, w, None, stride, pad, dilation, c)
    gy = torch.randn_like(y)

    def native_backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, (stride,) * 3, (pad,) * 3, (dilation,) * 3, False, (0, 0, 0), c, mask)

    xb, yb, wb = x.numel() * x.element_size(), y.numel() * y.element_size(), w.numel() * w.element_size()
    return {
        'forward': (lambda: dwconv3d.dwconv3d_forward(x, w, stride, dilation),
                    lambda: torch.nn.functional.conv3d(x, w, None, stride, pad, dilation, c), xb + yb + wb),
        'grad_input': (lambda: dwconv3d.dwconv3d_grad_input(gy, w, x.shape, stride, dilation),
                       native_backward((True, False, False)), xb + yb + wb),
        'grad_weight': (lambda: dwconv3d.dwconv3d_grad_weight(x, gy, k, stride, dilation),
                        native_backward((False, True, False)), xb + yb + w.numel() * 4),
    }


def _max_diff(fast, native):
    """Largest |triton - torch| relative to the largest |torch| (a sanity check of what is timed)."""
    a, b = fast(), native()
    b = next(t for t in b if t is not None) if isinstance(b, tuple) else b
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def bench_kernels(device, dtype=torch.float32, shapes=None, warmup_ms=25, rep_ms=100,
                  peak_gbps=3000.0):
    """Time forward / grad_input / grad_weight of each shape with the Triton kernels and with torch.

    Returns one dict per (shape, pass, impl): ms (median), GB/s achieved over the bytes the pass must
    move (inputs read once, output written once), % of peak_gbps, and rel_diff (triton vs torch).
    """
    device = torch.device(device)
    if device.type != 'cuda':
        raise utils.UserError(f'bench.py: bench_kernels needs a CUDA device, got {device}')
    if dwconv3d.triton is None:
        raise utils.UserError('bench.py: bench_kernels needs triton (pip install triton)')
    from triton.testing import do_bench
    rows = []
    for where, n, c, size, k, stride, dilation in shapes or DWCONV_SHAPES:
        passes = _dwconv_passes(n, c, size, k, stride, dilation, device, dtype)
        for name, (fast, native, nbytes) in passes.items():
            diff = _max_diff(fast, native)
            for impl, fn in (('triton', fast), ('torch', native)):
                ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode='median')
                gbps = nbytes / ms / 1e6
                rows.append(dict(where=where, shape=f'{n}x{c}x{size}^3', k=k, stride=stride, dilation=dilation,
                                 dtype=str(dtype).replace('torch.', ''), pass_=name, impl=impl, ms=ms,
                                 gbps=gbps, pct_peak=100 * gbps / peak_gbps, rel_diff=diff))
    return rows


def bench_launch(device, calls=500):
    """Host time per call (us) of the Triton forward launcher and of torch's conv3d, on a small and a search-
    sized tensor: the search step launches tens of thousands of convolutions, so this overhead adds up."""
    rows = []
    for shape, k in (((1, 4, 8, 8, 8), 3), ((7, 4, 32, 32, 32), 5)):
        x = torch.randn(*shape, device=device)
        w = torch.randn(shape[1], 1, k, k, k, device=device)
        for impl, fn in (('triton', lambda x=x, w=w: dwconv3d.dwconv3d_forward(x, w)),
                         ('torch', lambda x=x, w=w, k=k: torch.nn.functional.conv3d(x, w, None, 1, k // 2, 1,
                                                                                    x.shape[1]))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            host = time.perf_counter() - t0
            torch.cuda.synchronize(device)
            rows.append(f'{"x".join(map(str, shape)):14s} k={k} {impl:6s}: {1e6 * host / calls:6.1f} us/call host, '
                        f'{1e6 * (time.perf_counter() - t0) / calls:6.1f} us/call with the GPU')
    return '\n'.join(rows)


def kernels_table(rows):
    """The rows of bench_kernels as a fixed-width text table, triton and torch side by side."""
    lines = [f'{"where":30s} {"shape":14s} {"k":>2s} {"s":>2s} {"d":>2s} {"pass":12s} '
             f'{"triton ms":>9s} {"GB/s":>7s} {"%peak":>6s} {"torch ms":>9s} {"GB/s":>7s} {"speedup":>7s} '
             f'{"rel diff":>9s}']
    for fast, native in zip(rows[0::2], rows[1::2]):
        lines.append(f'{fast["where"]:30s} {fast["shape"]:14s} {fast["k"]:2d} {fast["stride"]:2d} '
                     f'{fast["dilation"]:2d} {fast["pass_"]:12s} {fast["ms"]:9.4f} {fast["gbps"]:7.0f} '
                     f'{fast["pct_peak"]:6.1f} {native["ms"]:9.4f} {native["gbps"]:7.0f} '
                     f'{native["ms"] / fast["ms"]:7.1f} {fast["rel_diff"]:9.1e}')
    return '\n'.join(lines)


def conv_calls(model, cube, batch):
    """(input shape, kernel, stride, dilation) of every depthwise convolution in one forward of `model` on a
    (batch, 1, cube^3) input, traced on the meta device (no memory, no compute)."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, inp, out: calls.append(
        (tuple(inp[0].shape), m.kernel_size[0], m.stride[0], m.dilation[0])))
        for m in model.modules() if isinstance(m, dwconv3d.DepthwiseConv3d)]
    autocast = torch.autocast  # (the models' forward opens an autocast region, which has no meta device)
    torch.autocast = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        model(torch.empty(batch, 1, cube, cube, cube, device='meta'))
    finally:
        torch.autocast = autocast
        for h in hooks:
            h.remove()
    return calls


def default_conv_calls():
    """{'search': calls, 'retrain': calls} of the search supernet and the retrain network at the scripts' defaults
    (train_search: C=16, 8 cells, 'mrfc' ops, batch 7; train_3D_continuation: the paper genotype, C=36, 20 cells,
    batch 4; cube 32)."""
    import genotypes
    from model import NetworkLUNA
    from model_search import SearchNetwork
    with torch.device('meta'):
        search = SearchNetwork(16, 2, 8, genotypes.mrfc(), k=4)
        retrain = NetworkLUNA(36, 2, 20, genotypes.NAS_HBO_PAPER)
    return {'search': conv_calls(search, 32, 7), 'retrain': conv_calls(retrain, 32, 4)}


def launch_plans(calls, dtypes=(torch.float32,), sms=132):
    """One launch of each distinct Triton binary that the forward, grad-input and grad-weight launches of `calls`
    compile (as specializations() counts them), as JSON-able plans [kernel name, num_warps, constants, arguments]:
    an argument is ['tensor', dtype] or ['int', value]. Nothing is launched (recorded on meta tensors)."""
    plans = {}

    def record(kernel, grid, args, warps, **consts):
        skip = {kernel.arg_names[i] if isinstance(i, int) else i for i in getattr(kernel, 'do_not_specialize', ())}
        spec = tuple(str(a.dtype) if torch.is_tensor(a) else
                     (None if name in skip else (a == 1, a % 16 == 0)) for name, a in zip(kernel.arg_names, args))
        key = (kernel.__name__, warps, tuple(sorted((k, str(v)) for k, v in consts.items())), spec)
        plans.setdefault(key, [kernel.__name__, warps, consts,
                               [['tensor', str(a.dtype).replace('torch.', '')] if torch.is_tensor(a) else ['int', a]
                                for a in args]])
    _record_launches(record, calls, dtypes, sms)
    return [plans[k] for k in sorted(plans)]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def compile_plans(plans, device):
    """Compile each plan into Triton's cache (TRITON_CACHE_DIR) without running it: on CUDA through the kernel's own
    warmup (the key a later launch looks up); on a CPU for an H100/H200 (sm_90) through triton.compile, to measure
    what a GPU machine's first use compiles (it needs Triton's bundled ptxas, not a GPU). Returns seconds per plan."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    seconds = []
    for name, warps, consts, args in plans:
        kernel, consts = getattr(dwconv3d, name), {k: _tuples(v) for k, v in consts.items()}
        t0 = time.perf_counter()
        if str(device).startswith('cuda'):
            values = [torch.empty(16, dtype=getattr(torch, a), device=device) if kind == 'tensor' else a
                      for kind, a in args]
            kernel.warmup(*values, grid=(1,), **consts, num_warps=warps, enable_fp_fusion=True)
        else:
            names = kernel.arg_names
            sig = {n: 'constexpr' if n in consts else
                   ('*' + {'float32': 'fp32', 'bfloat16': 'bf16'}[a[1]] if a[0] == 'tensor' else 'i32')
                   for n, a in zip(names, args + [None] * len(consts))}
            attrs = {(i,): [['tt.divisibility', 16]] for i, a in enumerate(args) if a[0] == 'tensor'}
            src = ASTSource(kernel, sig, {(names.index(k),): v for k, v in consts.items()}, attrs)
            triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': warps})
        seconds.append(time.perf_counter() - t0)
    return seconds


def compile_worker(plans_json, device):
    """A process of the parallel first use (benchmarks/gpu.py): compile its group of plans; prints one JSON line."""
    import json
    import time
    t0 = time.perf_counter()
    seconds = compile_plans(json.loads(plans_json), device)
    print(json.dumps({'binaries': len(seconds), 'compile_s': sum(seconds), 'process_s': time.perf_counter() - t0}),
          flush=True)


def specializations(calls, dtypes=(torch.float32, torch.bfloat16), sms=132):
    """The distinct Triton binaries the forward, grad-input and grad-weight launches of `calls` would compile, on a
    GPU with `sms` multiprocessors (an H100/H200: 132): a sorted list of (kernel, num_warps, constants, argument
    specialization), where the specialization is what Triton keys a binary on besides the constants: each tensor's
    dtype, and each integer argument it specializes (not in its do_not_specialize) by value 1 and divisibility by
    16. Nothing is launched (the launches are recorded on meta tensors)."""
    found = set()

    def record(kernel, grid, args, warps, **consts):
        skip = {kernel.arg_names[i] if isinstance(i, int) else i for i in getattr(kernel, 'do_not_specialize', ())}
        spec = tuple(str(a.dtype) if torch.is_tensor(a) else
                     (None if name in skip else (a == 1, a % 16 == 0)) for name, a in zip(kernel.arg_names, args))
        found.add((kernel.__name__, warps, tuple(sorted((k, str(v)) for k, v in consts.items())), spec))
    _record_launches(record, calls, dtypes, sms)
    return sorted(found)


def _record_launches(record, calls, dtypes, sms):
    """Call record(kernel, grid, args, warps, **constants) for each launch of the three passes of `calls`."""
    saved = dwconv3d._launch, dwconv3d.interpreted
    dwconv3d._launch, dwconv3d.interpreted = record, (lambda: True)
    try:
        for shape, k, stride, dil in dict.fromkeys(calls):
            for dtype in dtypes:
                x = torch.empty(shape, device='meta', dtype=dtype)
                w = torch.empty((shape[1], 1, k, k, k), device='meta', dtype=dtype)
                y = dwconv3d.dwconv3d_forward(x, w, stride, dil)
                dwconv3d.dwconv3d_grad_input(y, w, shape, stride, dil)
                dwconv3d.dwconv3d_grad_weight(x, y, k, stride, dil, split=-(-8 * sms // (shape[1] * k)))
    finally:
        dwconv3d._launch, dwconv3d.interpreted = saved
