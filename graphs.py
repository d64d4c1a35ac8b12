"""Whole-step CUDA graphs: a training step captured once per input shape and replayed, one launch for the step.

A step's host work (Python, autograd, ~5k-46k kernel launches) is paid once at capture; each replay copies the batch
into static input buffers and launches the recorded graph (PyTorch's "whole-network capture": forward, backward,
clipping and optimizer steps inside one graph). For that the steps must be graph-ready:
- no host syncs (tests/test_syncfree.py) and no Python state that differs between calls of one graph;
- values that change between replays live in device tensors updated in place: the weight optimizer's learning
  rate (graph_ready_sgd: a 0-dim tensor, the fused SGD kernel reads it on the device; the cosine schedule fills it
  once per epoch), the retrain's drop-path probability and the search's sparsemax temperature (graph_ready_values,
  set_value): every value a run schedules (tests/test_graphs.py replays frozen captures to check it);
- the architecture's Adam keeps its step counter on the device (capturable=True, CUDA only);
- random draws inside a step (drop path) come from the default CUDA generator, which graphs replay with fresh
  offsets; the augmentation runs before the copy into the static buffers, outside the graph, unchanged.
On the CPU the graph-ready steps compute what the eager ones do (tests/test_graphs.py), and StepGraphs runs eagerly
(enabled False), so nothing changes there.
"""
import contextlib
import signal
import threading
import time

import torch

import engine
from utils import UserError

WARMUP = 3  # eager calls of a step (on a side stream) before its capture: lazy state (momentum, Adam moments,
# cuDNN's choices, Triton's compilation) is created outside the graph


def graph_ready_sgd(optimizer):
    """Make an SGD optimizer replayable: its learning rate a 0-dim fp32 tensor on the parameters' device (updated in
    place by the lr schedulers), the fused kernel (reads that tensor on the device: no host sync, no value baked into
    a graph). Same updates as the foreach SGD up to fp32 rounding. Returns the optimizer."""
    for group in optimizer.param_groups:
        device = group['params'][0].device
        # a tensor on another device (a checkpoint is loaded onto the CPU) would be read once by the fused kernel
        # and baked into the graph: the schedule's later values would never reach it
        if not isinstance(group['lr'], torch.Tensor) or group['lr'].device != device:
            group['lr'] = torch.tensor(float(group['lr']), device=device)
        group['foreach'], group['fused'] = False, True
    return optimizer


def eager_ready(*optimizers):
    """Undo what graph_ready_sgd / graph_ready_adam left in optimizers restored from a checkpoint of a graphed run
    (a resume with CUDA_GRAPHS=False, or on the CPU): a plain float learning rate, torch's default kernel choice,
    Adam not capturable (which the CPU refuses). Returns nothing."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if isinstance(group['lr'], torch.Tensor):
                group['lr'] = float(group['lr'])
            if group.get('fused'):
                group['foreach'], group['fused'] = None, None
            if group.get('capturable'):
                group['capturable'] = False


def graph_ready_adam(optimizer):
    """Adam with its step counters on the device (capturable) where the parameters are on CUDA; unchanged on the
    CPU (torch's capturable Adam is CUDA-only, and a CPU step never waits)."""
    for group in optimizer.param_groups:
        if group['params'][0].is_cuda:
            group['capturable'] = True
            for p in group['params']:
                state = optimizer.state.get(p, {})
                if isinstance(state.get('step'), torch.Tensor):
                    state['step'] = state['step'].to(device=p.device, dtype=torch.float32)
    return optimizer


def set_value(obj, name, value):
    """obj.name = value, in place when it is a tensor (a captured graph reads that tensor's memory)."""
    old = getattr(obj, name)
    if isinstance(old, torch.Tensor):
        with torch.no_grad():
            old.fill_(float(value))
    else:
        setattr(obj, name, value)


SCHEDULED = ('drop_path_prob', 'tau')  # the model attributes a run changes between steps (per epoch): the retrain's
# drop-path probability, the search's sparsemax temperature. A graphed step reads them from a 0-dim device tensor
# (a Python number would be read once, at the capture, and baked into the graph: the schedule would silently stop)


def graph_ready_values(model, names=SCHEDULED):
    """Each of `names` that the model has, as a 0-dim fp32 tensor on the model's device (set_value updates it in
    place); an attribute already such a tensor is kept (the same object: a captured graph reads its memory)."""
    device = next(model.parameters()).device
    for name in names:
        value = getattr(model, name, None)
        if value is not None and not (isinstance(value, torch.Tensor) and value.device == device):
            setattr(model, name, torch.tensor(float(value), device=device))
    return model


def refuse_checkpointed_cells(model):
    """CUDA_GRAPHS with CHECKPOINT_CELLS: the recomputed cells save and restore the RNG state around each cell, which
    a capture cannot record; refused in one line (UserError)."""
    if getattr(model, 'checkpoint_cells', False):
        raise UserError('CUDA_GRAPHS and CHECKPOINT_CELLS cannot be combined (recomputed cells read the RNG state '
                        'during the capture): set one of them False')


def cuda_capture(fn, pool):
    """Record fn() into a CUDA graph (memory from `pool`, shared by a StepGraphs' graphs); (replay, outputs).
    A capture that fails leaves the current stream restored (torch's graph context restores it only after a
    capture_end that succeeded)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    except BaseException:
        torch.cuda.set_stream(stream)
        raise
    return graph.replay, outputs


@contextlib.contextmanager
def alarm_blocked():
    """SIGALRM held back (delivered at the end) in the main thread: an alarm between capture_begin and capture_end
    (a benchmark's cap, benchmarks/gpu.py) would break the capture and leave CUDA in a capturing state."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, 'pthread_sigmask'):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def generator_works(device):
    """One draw from the default generator of `device` (after a failed capture it can be left mid-capture)."""
    try:
        torch.rand(1, device=device)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


class CaptureBroken(RuntimeError):
    """A capture failed and left the device unusable for eager steps (the default generator mid-capture)."""


class StepGraphs:
    """fn(*inputs) -> tuple of tensors, captured once per (tag, input shapes and dtypes) and replayed.

    The first `warmup` calls of a key run eagerly (on a side stream on CUDA); the next one copies its inputs into
    static buffers, captures fn on them and replays it (the capture itself computes nothing), and every later call
    copies and replays. The last partial batch of an epoch has other shapes: it gets its own graph. Outputs are
    returned as clones (the static outputs are overwritten by the next replay). enabled False: every call runs
    fn eagerly, as without this class. capture(fn, pool) -> (replay, outputs) is cuda_capture unless injected
    (tests); the CUDA one refuses non-CUDA inputs with one line. If a capture fails, that key runs eagerly from then
    on and the reason is printed once (kept in `failures`; `stats` counts captures, eager calls and replays); a
    failure that leaves the CUDA generator unusable raises CaptureBroken. SIGALRM is held back during a capture.
    """

    def __init__(self, fn, enabled=True, warmup=WARMUP, capture=None, log=print):
        self.fn, self.enabled, self.warmup, self.log = fn, enabled, warmup, log
        self.capture = capture or cuda_capture
        self.graphs = {}  # key -> (static inputs, replay, static outputs), or None: this key runs eagerly
        self.calls = {}  # key -> eager calls so far
        self.pool = None
        self.side = None
        # what a benchmark reports (benchmarks/gpu_case.py): graphs captured, calls run eagerly (warm-ups, and keys
        # whose capture failed), replays, host seconds of each capture, and why a capture failed
        self.stats = {'captured': 0, 'warmup_calls': 0, 'eager_fallback_calls': 0, 'replays': 0, 'capture_s': []}
        self.failures = []

    def key(self, inputs, tag):
        return (tag,) + tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)

    def __call__(self, *inputs, tag=''):
        if not self.enabled:
            return self.fn(*inputs)
        key = self.key(inputs, tag)
        if key in self.graphs:
            entry = self.graphs[key]
            if entry is None:
                self.stats['eager_fallback_calls'] += 1
                return self.fn(*inputs)
            return self._replay(entry, inputs)
        if self.capture is cuda_capture and not all(t.is_cuda for t in inputs):
            raise UserError('CUDA_GRAPHS needs the CUDA device: the step inputs are on '
                            f'{inputs[0].device} (set CUDA_GRAPHS=False or DEVICE=cuda)')
        n = self.calls.get(key, 0)
        if n < self.warmup:
            self.calls[key] = n + 1
            self.stats['warmup_calls'] += 1
            with self._side_stream():
                return self.fn(*inputs)
        return self._capture(key, inputs)

    @contextlib.contextmanager
    def _side_stream(self):
        if self.capture is not cuda_capture:
            yield
            return
        if self.side is None:  # one side stream for all warm-ups (blocks freed on it are reused on it)
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def _capture(self, key, inputs):
        static = [t.detach().clone() for t in inputs]
        if self.pool is None and self.capture is cuda_capture:
            self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        try:
            with alarm_blocked():
                replay, outputs = self.capture(lambda: self.fn(*static), self.pool)
        except RuntimeError as e:  # an op that cannot be captured (torch names it), or out of memory
            what = 'out of memory during the capture' if isinstance(e, torch.cuda.OutOfMemoryError) else \
                str(e).splitlines()[0][:200]
            where = f'the step {key[0] or ""}{[k[0] for k in key[1:]]}'
            self.failures.append(f'{where}: {what}')
            if self.capture is cuda_capture and not generator_works(inputs[0].device):
                raise CaptureBroken(f'CUDA graphs: capturing {where} failed ({what}) and left the CUDA generator '
                                    'unusable: rerun with CUDA_GRAPHS=False (a run resumes from its checkpoint)') \
                    from e
            self.log(f'CUDA graphs: capturing {where} failed ({what}); it runs eagerly')
            self.graphs[key] = None
            self.stats['eager_fallback_calls'] += 1
            return self.fn(*inputs)
        self.stats['capture_s'].append(time.perf_counter() - t0)
        self.stats['captured'] += 1
        self.graphs[key] = (static, replay, outputs)
        return self._replay(self.graphs[key], inputs)

    def _replay(self, entry, inputs):
        static, replay, outputs = entry
        with torch.no_grad():
            for s, t in zip(static, inputs):
                s.copy_(t)
        replay()
        self.stats['replays'] += 1
        return tuple(o.clone() for o in outputs)


def retrain_step(model, optimizer, params, grad_clip, cuda_graphs=False, **kw):
    """step(x, y) -> (loss, number correct): engine.train_step, graphed with CUDA_GRAPHS (the optimizer and the
    model's drop path made graph-ready here; call this after a checkpoint was loaded into them)."""
    if not cuda_graphs:
        eager_ready(optimizer)
        return lambda x, y: engine.train_step(model, optimizer, x, y, params, grad_clip)
    refuse_checkpointed_cells(model)
    graph_ready_sgd(optimizer)
    graph_ready_values(model)
    graphs = StepGraphs(lambda x, y: engine.train_step(model, optimizer, x, y, params, grad_clip), **kw)
    return graphs


def search_steps(model, w_opt, updater, grad_clip, cuda_graphs=False, **kw):
    """step(x, y, arch_on, val_stream, keep) -> (loss, number correct) of train_search's epoch: the architecture step
    (after warm-up) then the weight step; keep collects (P(malignant), labels) as engine.train_step does. With
    CUDA_GRAPHS the steps are graphed, one graph per phase and batch shapes: first and second order (architecture +
    weight step; the weight step alone in the warm-up), zeroth order (the weight step alone; twin + weight step;
    twin + weight + architecture step at a period's end), whose period start and counting stay in Python (the twin's
    tensors are then kept for the whole run and refilled in place)."""
    zeroth = not hasattr(updater, 'second_order_grads')

    def eager(x, y, arch_on, val_stream, keep):
        if zeroth:
            return updater.weight_step(x, y, arch_on, val_stream, keep)
        if arch_on:
            updater.step(x, y, *val_stream.next(), w_opt.param_groups[0]['lr'])
        return engine.train_step(model, w_opt, x, y, model.weight_parameters(), grad_clip, keep)
    if not cuda_graphs:
        eager_ready(w_opt, updater.a_opt if zeroth else updater.a_optimizer,
                    *([updater.twin['opt']] if zeroth and updater.twin is not None else []))
        return eager
    refuse_checkpointed_cells(model)
    graph_ready_sgd(w_opt)
    graph_ready_values(model)
    graph_ready_adam(updater.a_opt if zeroth else updater.a_optimizer)
    if zeroth:
        updater.make_persistent()
        if updater.twin is not None:  # a resumed period
            graph_ready_sgd(updater.twin['opt'])

    def fn(x, y, *val):
        kept = []
        if zeroth:
            loss, hits = updater.steps(x, y, val, kept)
        else:
            if val:
                updater.step(x, y, *val, w_opt.param_groups[0]['lr'])
            loss, hits = engine.train_step(model, w_opt, x, y, model.weight_parameters(), grad_clip, kept)
        return loss, hits, kept[0][0]
    graphs = StepGraphs(fn, **kw)

    def step(x, y, arch_on, val_stream, keep):
        if zeroth:
            val = updater.begin(arch_on, val_stream)
            tag = 'weights' if updater.twin is None else 'twin'
        else:
            val, tag = (val_stream.next() if arch_on else ()), ('arch' if arch_on else 'weights')
        loss, hits, prob = graphs(x, y, *val, tag=tag)
        if zeroth:
            updater.end(val)
        if keep is not None:
            keep.append((prob, y))
        return loss, hits
    step.graphs = graphs
    return step
