import sys, time, torch
import bench, dwconv3d
from torch.profiler import profile, ProfilerActivity
torch.backends.cudnn.benchmark = True
cfg = dict(bench.DEFAULTS)
what = sys.argv[1]
if what == 'launch':
    for shape, k in (((1, 4, 8, 8, 8), 3), ((7, 4, 32, 32, 32), 5)):
        x = torch.randn(*shape, device='cuda'); w = torch.randn(shape[1], 1, k, k, k, device='cuda')
        for name, fn in (('triton', lambda: dwconv3d.dwconv3d_forward(x, w, 1, 1)),
                         ('torch', lambda: torch.nn.functional.conv3d(x, w, None, 1, k // 2, 1, shape[1]))):
            for _ in range(20): fn()
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(500): fn()
            t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
            print(f'{shape} k={k} {name}: {1e6*(t1-t0)/500:.1f} us/call host, {1e6*(t2-t0)/500:.1f} us/call total')
if what in ('search', 'native'):
    dwconv3d.set_fast_kernels(what == 'search')
    step = bench.search_step('second', 7, cfg)
    for _ in range(2): step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter(); step(); torch.cuda.synchronize(); print('profiled step', time.perf_counter() - t0, 's')
    ka = p.key_averages()
    print(ka.table(sort_by='self_cuda_time_total', row_limit=25, max_name_column_width=60))
    if what == 'search':
        print(ka.table(sort_by='self_cpu_time_total', row_limit=20, max_name_column_width=60))
if what == 'retrain':
    for fast in (True, False):
        dwconv3d.set_fast_kernels(fast)
        ms, peak, first = bench.time_steps(lambda: bench.retrain_step(4, cfg), 'cuda', 2, 5)
        print(f'retrain fast={fast}: {ms:.1f} ms/step, peak {peak:.2f} GB, first {first:.1f} s', flush=True)
    dwconv3d.set_fast_kernels(True)
    print('largest retrain batch in 24 GB:', bench.largest_batch(lambda b: bench.retrain_step(b, cfg), 4, cfg))
if what == 'steps':
    for h in ('second', 'first'):
        ms, peak, first = bench.time_steps(lambda: bench.search_step(h, 7, cfg), 'cuda', 2, 3)
        print(f'search {h} fast: {ms:.1f} ms/step, peak {peak:.2f} GB, first {first:.1f} s', flush=True)
if what == 'retrain1':
    ms, peak, first = bench.time_steps(lambda: bench.retrain_step(4, cfg), 'cuda', 2, 5)
    print(f'retrain fast: {ms:.1f} ms/step, peak {peak:.2f} GB, first {first:.1f} s', flush=True)
