"""Depthwise 3D convolution: the one place where the fast GPU kernels plug in.

DepthwiseConv3d is an nn.Conv3d with groups == channels and no bias. On CUDA, with triton importable,
FAST_KERNELS on and a supported configuration (cubic kernel 3 or 5, dilation 1 or 2, stride 1 or 2,
"same" padding dilation*(k-1)//2, fp32 or bf16, also under autocast), it runs the Triton kernels
below; everywhere else it is exactly nn.Conv3d. The launchers (dwconv3d_forward, dwconv3d_grad_input,
dwconv3d_grad_weight) take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton
was first imported: they then run in Triton's interpreter (slow; for tests).

Kernel design. Tensors are NCDHW contiguous, so W, then H, are contiguous in memory.
- A program owns one (n, c) volume, BLOCK voxels of the flattened (H, W) plane (consecutive lanes
  read consecutive addresses: coalesced) and ROWS consecutive depth rows, kept as ROWS fp32
  accumulators per lane. For each (kh, kw) tap an input plane is loaded once and feeds every output
  row that uses it (up to k rows, through different kd), so a voxel costs ~k^2 (ROWS*s + (k-1)*dil)
  / ROWS loads instead of k^3. All taps are unrolled; spatial sizes and channel counts are runtime
  arguments and the tile (ROWS, BLOCK) is one per kernel (TILE, GRAD_WEIGHT_TILE), so one compiled binary
  serves every layer: a fresh machine compiles a few dozen kernels, not one per layer shape.
- Grad-input is the same gather on the transposed geometry. With stride 2 the input voxels split into
  8 parity classes (one launch each); inside a class only taps of matching parity contribute and the
  gather is dense again (a class with no matching tap is written with zeros).
- Grad-weight: a program owns one (channel, kernel row kh) and a strided share of the (n, depth block,
  hw block) tiles, with the same plane reuse; it keeps k^2 per-lane fp32 sums (k^3 would not fit in
  registers for k = 5), reduces them across lanes once at the end into a (C, SPLIT, k^3) buffer
  that torch sums: deterministic, no atomics.
Loads are converted to fp32 and accumulated in fp32; outputs are written in the input's dtype.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module falls back to torch everywhere
    triton = None
    tl = None
# Sizes, channel counts and tile counts are runtime arguments, not specialized on their values (Triton would
# compile a binary per divisibility by 16 and per value 1): one binary per kernel, stride, dilation, dtype and
# parity class serves every layer of every network.
RUNTIME = {'_gather_kernel': ('C', 'SD', 'SH', 'SW', 'DD', 'DH', 'DW', 'AD', 'AH', 'AW'),
           '_grad_weight_kernel': ('C', 'NTILES', 'SD', 'SH', 'SW', 'OD', 'OH', 'OW', 'SPLIT')}


def _jit(fn):
    if triton is None:
        return fn  # never launched: every caller checks for triton first
    return triton.jit(fn, do_not_specialize=RUNTIME[fn.__name__])

FAST_KERNELS = True  # use the Triton kernels where supported; set_fast_kernels(False) compares with torch
KERNEL_SIZES = (3, 5)
DILATIONS = (1, 2)
STRIDES = (1, 2)
DTYPES = (torch.float32, torch.bfloat16)


def set_fast_kernels(enabled: bool):
    """Switch the Triton path of DepthwiseConv3d on or off (module-wide)."""
    global FAST_KERNELS
    FAST_KERNELS = bool(enabled)


@_jit
def _gather_kernel(src, wt, dst, C, SD, SH, SW, DD, DH, DW, AD, AH, AW,
                   K: tl.constexpr, SI: tl.constexpr, SO: tl.constexpr,
                   PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   HTAPS: tl.constexpr, WTAPS: tl.constexpr, PLANES: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """dst[a*SO + p] = sum over taps of w[tap] * src[a*SI + off(tap)], a over the (AD, AH, AW) grid.

    HTAPS, WTAPS and PLANES come from _plan. Grid: (N*C, hw blocks of BLOCK, depth blocks of ROWS).
    src (N, C, SD, SH, SW), wt (C, K^3), dst (N, C, DD, DH, DW); p = (PD, PH, PW).
    """
    nc = tl.program_id(0)
    a0 = tl.program_id(2) * ROWS
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index into the (AH, AW) grid
    hw_ok = hw < AH * AW
    ah = hw // AW
    aw = hw % AW
    src_a0 = src + nc * (SD * SH * SW) + a0 * SI * (SH * SW)
    w_c = wt + (nc % C) * (K * K * K)
    accs = ()
    for _ in tl.static_range(ROWS):
        accs = accs + (tl.zeros([BLOCK], dtype=tl.float32),)
    # Kernel rows kh in a loop, the rest unrolled: a fully unrolled body makes Triton's coalescing pass
    # take minutes (it walks the whole dependence slice of every load).
    for ih in range(HTAPS[2]):
        kh = HTAPS[0] + HTAPS[1] * ih
        sh = ah * SI + (HTAPS[3] + HTAPS[4] * ih)
        m_h = hw_ok & (sh >= 0) & (sh < SH)
        p_h = src_a0 + sh * SW
        for iw in tl.static_range(len(WTAPS)):
            # WTAPS[iw] = (kw, w offset). Indexed where used: a tuple wrapped in tl.constexpr breaks Triton 3.6's
            # interpreter, and a name bound to a constant is no longer one to Triton's compiler (slices need it)
            sw = aw * SI + WTAPS[iw][1]
            m_hw = m_h & (sw >= 0) & (sw < SW)
            wk = ()
            for kd in tl.static_range(K):
                wk = wk + (tl.load(w_c + kd * K * K + kh * K + WTAPS[iw][0]).to(tl.float32),)
            for j in tl.static_range(len(PLANES)):
                zi = a0 * SI + PLANES[j][0]  # PLANES[j] = (z, row, kd, row, kd, ...): plane a0*SI + z, read once
                # (a scalar condition selects the mask: the interpreter mistypes block & scalar booleans)
                xv = tl.load(p_h + sw + PLANES[j][0] * (SH * SW), mask=tl.where((zi >= 0) & (zi < SD), m_hw, False),
                             other=0.0).to(tl.float32)
                for u in tl.static_range(1, len(PLANES[j]), 2):  # (row, kd) = PLANES[j][u], PLANES[j][u + 1]
                    accs = (accs[:PLANES[j][u]] + (tl.fma(xv, wk[PLANES[j][u + 1]], accs[PLANES[j][u]]),)
                            + accs[PLANES[j][u] + 1:])
    dst_hw = dst + nc * (DD * DH * DW) + (ah * SO + PH) * DW + aw * SO + PW
    for r in tl.static_range(ROWS):
        a = a0 + r
        out = accs[r].to(dst.dtype.element_ty)
        tl.store(dst_hw + (a * SO + PD) * (DH * DW), out, mask=tl.where(a < AD, hw_ok, False))


@_jit
def _grad_weight_kernel(x, gy, part, C, NTILES, SD, SH, SW, OD, OH, OW, SPLIT,
                        K: tl.constexpr, STRIDE: tl.constexpr, DIL: tl.constexpr, PAD: tl.constexpr,
                        TAPS: tl.constexpr, PLANES: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """part[c, s, kd*K*K + kh*K + kw] = sum over tiles s, s+SPLIT, ... of gy[n, c, a] * x[n, c, a*STRIDE + off].

    Grid: (C*K, SPLIT), program (c*K + kh, s): one kernel row kh, so K*K fp32 sums per lane (all k^3
    would not fit in registers for k = 5); the K programs of a channel run side by side and share x
    and gy through L2. A tile is (n, ROWS depth rows, BLOCK voxels of the (OH, OW) plane);
    NTILES = N * ceil(OD/ROWS) * ceil(OH*OW/BLOCK). x (N, C, SD, SH, SW), gy (N, C, OD, OH, OW).
    TAPS = ((kw, w offset), ...), PLANES as in _plan.
    """
    c = tl.program_id(0) // K
    kh = tl.program_id(0) % K
    NHW = (OH * OW + BLOCK - 1) // BLOCK
    NDHW = (OD + ROWS - 1) // ROWS * NHW
    accs = ()
    for _ in tl.static_range(K * K):
        accs = accs + (tl.zeros([BLOCK], dtype=tl.float32),)
    for tile in range(tl.program_id(1), NTILES, SPLIT):
        nc = (tile // NDHW) * C + c
        a0 = (tile % NDHW) // NHW * ROWS
        hw = (tile % NHW) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index into the (OH, OW) plane
        hw_ok = hw < OH * OW
        gys = ()
        for r in tl.static_range(ROWS):
            g = tl.load(gy + nc * (OD * OH * OW) + (a0 + r) * (OH * OW) + hw,
                        mask=tl.where(a0 + r < OD, hw_ok, False), other=0.0)
            gys = gys + (g.to(tl.float32),)
        sh = hw // OW * STRIDE + kh * DIL - PAD
        m_h = hw_ok & (sh >= 0) & (sh < SH)
        x_a0 = x + nc * (SD * SH * SW) + a0 * STRIDE * (SH * SW) + sh * SW
        for i in tl.static_range(len(TAPS)):
            sw = hw % OW * STRIDE + TAPS[i][1]  # TAPS[i] = (kw, w offset), indexed where used (_gather_kernel)
            m_hw = m_h & (sw >= 0) & (sw < SW)
            for j in tl.static_range(len(PLANES)):
                zi = a0 * STRIDE + PLANES[j][0]
                xv = tl.load(x_a0 + sw + PLANES[j][0] * (SH * SW), mask=tl.where((zi >= 0) & (zi < SD), m_hw, False),
                             other=0.0).to(tl.float32)
                for u in tl.static_range(1, len(PLANES[j]), 2):  # (row, kd) -> accumulator kd*K + kw
                    accs = (accs[:PLANES[j][u + 1] * K + TAPS[i][0]]
                            + (tl.fma(xv, gys[PLANES[j][u]], accs[PLANES[j][u + 1] * K + TAPS[i][0]]),)
                            + accs[PLANES[j][u + 1] * K + TAPS[i][0] + 1:])
    out = part + (c * SPLIT + tl.program_id(1)) * (K * K * K) + kh * K
    for i in tl.static_range(K * K):
        tl.store(out + (i // K) * (K * K) + i % K, tl.sum(accs[i], axis=0))


@functools.lru_cache(maxsize=None)
def _plan(k, stride, dilation, rows, transposed=False, parity=(0, 0, 0)):
    """The structure of one launch, as compile-time tuples.

    Along each axis, tap j reads src index a*SI + off(j): forward off = j*dilation - pad (SI = stride);
    transposed (grad-input of parity p, SI = 1) off = (p + pad - j*dilation) / stride, only where exact.
    Returns HTAPS = (first kh, kh step, count, first h offset, offset step) (the valid kh form a
    progression), WTAPS = ((kw, w offset), ...) and PLANES = ((z, row, kd, row, kd, ...), ...): the
    relative source planes z = row*SI + off_d(kd) that some output row reads, each listed once.
    """
    pad = dilation * (k - 1) // 2

    def offsets(p):
        if not transposed:
            return {j: j * dilation - pad for j in range(k)}
        return {j: (p + pad - j * dilation) // stride for j in range(k) if (p + pad - j * dilation) % stride == 0}

    si = 1 if transposed else stride
    off_d, off_h, off_w = (offsets(p) for p in parity)
    kh, oh = list(off_h), list(off_h.values())
    step = (kh[1] - kh[0], oh[1] - oh[0]) if len(kh) > 1 else (1, 0)
    htaps = (kh[0] if kh else 0, step[0], len(kh), oh[0] if oh else 0, step[1])
    planes = {}
    for r in range(rows):
        for kd, od in off_d.items():
            planes.setdefault(r * si + od, []).append((r, kd))
    # flat int tuples: Triton's constexpr tuples nest only two deep in older versions (3.6)
    return htaps, tuple(off_w.items()), tuple((z,) + sum(users, ()) for z, users in sorted(planes.items()))


def _out_size(size, k, stride, dilation):
    return (size + 2 * (dilation * (k - 1) // 2) - dilation * (k - 1) - 1) // stride + 1


TILE = (8, 128, 2)  # forward and grad-input: (ROWS depth rows, BLOCK voxels of a plane, num_warps), 2 voxels/lane
GRAD_WEIGHT_TILE = (8, 128, 4)  # grad-weight: one voxel per lane (K*K sums + ROWS gy values in registers)
COMPILE_NOTICE = ('compiling the Triton depthwise kernels (first use on this machine; about a minute, then cached '
                  'by Triton) ...')
_noticed = []


def _notice():
    """Say once per process that kernels are being compiled (a silent first step looks like a hang)."""
    if not _noticed:
        _noticed.append(True)
        print(COMPILE_NOTICE, flush=True)


_COMPILED = {}  # launch configuration -> (Triton's compiled kernel, compile-time constants in signature order)


def _launch(kernel, grid, args, warps, **consts):
    """kernel[grid](*args, **consts), reusing the compiled kernel of an earlier launch of the same configuration.

    Triton's own launcher re-derives the compiled kernel from every argument on each call: with these
    kernels' tuple constants that cost ~80 us of host time per launch on the GPU machine (a torch
    convolution: ~16 us), and a search step launches tens of thousands. The key holds everything Triton
    specializes a compiled kernel on: the constants, each tensor's dtype and 16-byte alignment, each
    integer's width, value 1 and divisibility by 16, and the device.
    """
    if interpreted():
        _interpreter_index_fix()
        kernel[grid](*args, **consts, num_warps=warps, enable_fp_fusion=True)
        return
    key = (kernel.__name__, warps, args[0].device.index, tuple(consts.items()),
           tuple((a.dtype, a.data_ptr() % 16 == 0) if torch.is_tensor(a) else
                 (-2 ** 31 <= a < 2 ** 31, a == 1, a % 16 == 0) for a in args))
    hit = _COMPILED.get(key)
    if hit is None:
        _notice()  # (Triton's own disk cache may make this fast; the line is printed once per process)
        compiled = kernel[grid](*args, **consts, num_warps=warps, enable_fp_fusion=True)  # compiles and runs
        if hasattr(compiled, 'function'):  # a compiled kernel (the launch API Triton 3.x has)
            _COMPILED[key] = (compiled, tuple(consts[name] for name in kernel.arg_names[len(args):]))
        return
    compiled, constants = hit
    compiled[grid](*args, *constants, stream=torch.cuda.current_stream(args[0].device).cuda_stream)


def _interpreter_index_fix():
    """Let a runtime scalar bound a range() in Triton's interpreter on every Triton version (tests only).

    The interpreter holds a scalar as a 1-element array; Triton before 3.7 turns it into an int with
    int(array), which NumPy 2.4 refuses for arrays that are not 0-dimensional ('only 0-dimensional arrays can be
    converted to Python scalars'): the grad-weight kernel's loop over its tiles would fail there. Wrapping the
    interpreter's tensor patch (applied at every launch) keeps the kernels one source for both backends."""
    from triton.runtime import interpreter
    patch = getattr(interpreter, '_patch_lang_tensor', None)
    if patch is None or getattr(patch, 'index_fixed', False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.reshape(-1)[0]))
    patched.index_fixed = True
    interpreter._patch_lang_tensor = patched


def interpreted():
    """True when triton was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors."""
    return triton is not None and not isinstance(_gather_kernel, triton.runtime.JITFunction)


def _check(x, w, stride, dilation):
    if triton is None:
        raise RuntimeError('dwconv3d: triton is not installed')
    if not (x.is_cuda or interpreted()):
        raise RuntimeError('dwconv3d: the kernels need CUDA tensors, or TRITON_INTERPRET=1 set before '
                           'triton is first imported (then they run in the interpreter)')
    k = w.shape[-1]
    if x.dim() != 5 or tuple(w.shape) != (x.shape[1], 1, k, k, k):
        raise ValueError(f'dwconv3d: expected x (N, C, D, H, W) and weight (C, 1, k, k, k), '
                         f'got {tuple(x.shape)} and {tuple(w.shape)}')
    if k not in KERNEL_SIZES or stride not in STRIDES or dilation not in DILATIONS:
        raise ValueError(f'dwconv3d: unsupported kernel {k}, stride {stride}, dilation {dilation}')
    if x.dtype not in DTYPES or x.numel() >= 2 ** 31:
        raise ValueError(f'dwconv3d: unsupported input {x.dtype} with {x.numel()} elements')
    return k


def dwconv3d_forward(x, w, stride=1, dilation=1):
    """y = conv3d(x, w, stride, padding=dilation*(k-1)//2, dilation, groups=C); y has x's dtype.

    x (N, C, D, H, W), w (C, 1, k, k, k) -> y (N, C, D', H', W'), D' = (D - 1) // stride + 1.
    """
    k = _check(x, w, stride, dilation)
    n, c, d, h, wd = x.shape
    od, oh, ow = (_out_size(s, k, stride, dilation) for s in (d, h, wd))
    y = torch.empty((n, c, od, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    rows, block, warps = TILE
    grid = (n * c, triton.cdiv(oh * ow, block), triton.cdiv(od, rows))
    htaps, wtaps, planes = _plan(k, stride, dilation, rows)
    _launch(_gather_kernel, grid, (x.contiguous(), w.contiguous(), y, c, d, h, wd, od, oh, ow, od, oh, ow), warps,
            K=k, SI=stride, SO=1, PD=0, PH=0, PW=0, HTAPS=htaps, WTAPS=wtaps, PLANES=planes, ROWS=rows, BLOCK=block)
    return y


def dwconv3d_grad_input(gy, w, x_shape, stride=1, dilation=1):
    """Gradient of dwconv3d_forward w.r.t. its input: gy (N, C, D', H', W') -> (N, C, D, H, W) = x_shape."""
    n, c, d, h, wd = x_shape
    k = _check(gy, w, stride, dilation)
    if tuple(gy.shape[2:]) != tuple(_out_size(s, k, stride, dilation) for s in (d, h, wd)):
        raise ValueError(f'dwconv3d: grad {tuple(gy.shape)} does not match input shape {tuple(x_shape)}')
    if n * c * d * h * wd >= 2 ** 31:
        raise ValueError(f'dwconv3d: input shape {tuple(x_shape)} has too many elements for int32 offsets')
    gx = torch.empty(tuple(x_shape), dtype=gy.dtype, device=gy.device)
    gy, w = gy.contiguous(), w.contiguous()
    for pd, ph, pw in itertools.product(range(stride), repeat=3):
        # Parity class (pd, ph, pw): input voxels (a*stride + p), a over the (ad, ah, aw) grid.
        ad, ah, aw = ((s - p + stride - 1) // stride for s, p in zip((d, h, wd), (pd, ph, pw)))
        if n * c * ad * ah * aw == 0:
            continue
        rows, block, warps = TILE
        grid = (n * c, triton.cdiv(ah * aw, block), triton.cdiv(ad, rows))
        htaps, wtaps, planes = _plan(k, stride, dilation, rows, transposed=True, parity=(pd, ph, pw))
        _launch(_gather_kernel, grid, (gy, w, gx, c, *gy.shape[2:], d, h, wd, ad, ah, aw), warps, K=k, SI=1,
                SO=stride, PD=pd, PH=ph, PW=pw, HTAPS=htaps, WTAPS=wtaps, PLANES=planes, ROWS=rows, BLOCK=block)
    return gx


def dwconv3d_grad_weight(x, gy, kernel_size, stride=1, dilation=1, split=None):
    """Gradient of dwconv3d_forward w.r.t. its weight, in fp32: (C, 1, k, k, k).

    x (N, C, D, H, W), gy (N, C, D', H', W'). split: programs per (channel, kernel row) (default: enough
    to fill the GPU; each sums a strided share of the tiles).
    """
    k = kernel_size
    n, c, d, h, wd = x.shape
    _check(x, x.new_empty((c, 1, k, k, k)), stride, dilation)
    od, oh, ow = gy.shape[2:]
    if tuple(gy.shape) != (n, c) + tuple(_out_size(s, k, stride, dilation) for s in (d, h, wd)):
        raise ValueError(f'dwconv3d: grad {tuple(gy.shape)} does not match input {tuple(x.shape)}')
    rows, block, warps = GRAD_WEIGHT_TILE
    ntiles = n * triton.cdiv(od, rows) * triton.cdiv(oh * ow, block)
    if split is None:
        target = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
        split = triton.cdiv(target, c * k)
    split = max(1, min(split, ntiles))
    pad = dilation * (k - 1) // 2
    part = torch.empty((c, split, k ** 3), dtype=torch.float32, device=x.device)
    if part.numel() == 0 or ntiles == 0:
        return torch.zeros((c, 1, k, k, k), dtype=torch.float32, device=x.device)
    _, wtaps, planes = _plan(k, stride, dilation, rows)
    _launch(_grad_weight_kernel, (c * k, split, 1),
            (x.contiguous(), gy.contiguous(), part, c, ntiles, d, h, wd, od, oh, ow, split), warps,
            K=k, STRIDE=stride, DIL=dilation, PAD=pad, TAPS=wtaps, PLANES=planes, ROWS=rows, BLOCK=block)
    return part.sum(1).view(c, 1, k, k, k)


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """Autograd wrapper of the three launchers, differentiable any number of times.

    All three are one trilinear form B(x, w, gy) = <conv(x, w), gy>: forward is dB/dgy, grad-input dB/dx and
    grad-weight dB/dw. So the derivatives of each are again these launchers (_GradInput, _GradWeight), and a
    double backward (the search's exact Hessian-vector product, create_graph=True) stays on the fast kernels.
    A plain backward (grad mode off inside it) calls the launchers directly, without the extra Function layer.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, dilation)
        return dwconv3d_forward(x, weight, stride, dilation)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, dilation = ctx.conv
        gy = gy.to(x.dtype).contiguous()
        graph = torch.is_grad_enabled()  # backward with create_graph=True: its result must be differentiable
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (_GradInput.apply(gy, weight, x.shape, stride, dilation) if graph
                  else dwconv3d_grad_input(gy, weight, x.shape, stride, dilation))
        if ctx.needs_input_grad[1]:
            k = weight.shape[-1]
            gw = (_GradWeight.apply(x, gy, k, stride, dilation) if graph
                  else dwconv3d_grad_weight(x, gy, k, stride, dilation)).to(weight.dtype)
        return gx, gw, None, None


class _GradInput(torch.autograd.Function):
    """gx = dB/dx (gy, w): its derivative w.r.t. gy is conv(., w), w.r.t. w grad-weight(., gy)."""

    @staticmethod
    def forward(ctx, gy, weight, x_shape, stride, dilation):
        ctx.save_for_backward(gy, weight)
        ctx.conv = (stride, dilation)
        return dwconv3d_grad_input(gy, weight, x_shape, stride, dilation)

    @staticmethod
    def backward(ctx, ggx):
        gy, weight = ctx.saved_tensors
        stride, dilation = ctx.conv
        ggx = ggx.to(gy.dtype).contiguous()
        d_gy = _DepthwiseConv3dFunction.apply(ggx, weight, stride, dilation) if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:
            d_w = _GradWeight.apply(ggx, gy, weight.shape[-1], stride, dilation).to(weight.dtype)
        return d_gy, d_w, None, None, None


class _GradWeight(torch.autograd.Function):
    """gw = dB/dw (x, gy), fp32: its derivative w.r.t. x is grad-input(gy, .), w.r.t. gy conv(x, .)."""

    @staticmethod
    def forward(ctx, x, gy, kernel_size, stride, dilation):
        ctx.save_for_backward(x, gy)
        ctx.conv = (stride, dilation)
        return dwconv3d_grad_weight(x, gy, kernel_size, stride, dilation)

    @staticmethod
    def backward(ctx, ggw):
        x, gy = ctx.saved_tensors
        stride, dilation = ctx.conv
        ggw = ggw.to(x.dtype).contiguous()
        d_x = _GradInput.apply(gy, ggw, x.shape, stride, dilation) if ctx.needs_input_grad[0] else None
        d_gy = _DepthwiseConv3dFunction.apply(x, ggw, stride, dilation) if ctx.needs_input_grad[1] else None
        return d_x, d_gy, None, None, None


class DepthwiseConv3d(nn.Conv3d):
    """Conv3d with groups == channels and no bias. Shapes: (N, C, D, H, W) -> (N, C, D', H', W')."""

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(channels, channels, kernel_size, stride, padding, dilation,
                         groups=channels, bias=False)

    def _fast_dtype(self, x):
        """The dtype the Triton path would compute in, or None when it does not apply to x."""
        if not (FAST_KERNELS and triton is not None and x.is_cuda and x.dim() == 5):
            return None
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        if (self.kernel_size != (k,) * 3 or self.stride != (s,) * 3 or self.dilation != (d,) * 3
                or k not in KERNEL_SIZES or s not in STRIDES or d not in DILATIONS
                or self.padding != (d * (k - 1) // 2,) * 3 or self.padding_mode != 'zeros'
                or x.shape[1] != self.in_channels or x.numel() == 0 or x.numel() >= 2 ** 31):
            return None
        if torch.is_autocast_enabled('cuda'):
            dtype = torch.get_autocast_dtype('cuda')
        elif x.dtype == self.weight.dtype:
            dtype = x.dtype
        else:
            return None
        return dtype if dtype in DTYPES else None

    def forward(self, x):
        dtype = self._fast_dtype(x)
        if dtype is None:
            return super().forward(x)
        return _DepthwiseConv3dFunction.apply(x.to(dtype), self.weight.to(dtype), self.stride[0], self.dilation[0])
