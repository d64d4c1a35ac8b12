"""The loops shared by the scripts: one training step, evaluation, checkpoints, and the NaN guard."""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from data import batches
from runfolder import load_checkpoint, rng_states, save_atomic, set_rng_states
from utils import UserError, binary_metrics, progress

CHECK_EVERY = 20  # training steps between reads of the losses for NaN/inf (each read waits for the device)


def check_finite(loss, where, run_path, checkpoint='last.pt'):
    """Stop the run on a NaN/inf loss; the checkpoint of the last good epoch (run_path/checkpoint) stays.
    run_path None: no run folder (e.g. evaluating a saved model)."""
    if not math.isfinite(float(loss)):
        if run_path is None:
            raise UserError(f'loss is {float(loss)} at {where}: the model gives non-finite outputs')
        path = os.path.join(run_path, checkpoint)
        kept = f'the last good checkpoint is kept in {path}' if os.path.exists(path) else 'no checkpoint yet'
        raise UserError(f'loss is {float(loss)} at {where}; stopping: {kept} (try a lower learning rate)')


def train_step(model, optimizer, x, y, params, grad_clip, keep=None):
    """One SGD step on a batch; returns (loss tensor, number correct) without a host sync. keep: a list to which
    (P(malignant) (B,), labels (B,)) of the batch, as predicted before the step, are appended (on the device)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    if keep is not None:
        keep.append((F.softmax(logits.detach().float(), 1)[:, 1], y))
    loss = F.cross_entropy(logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def run_epoch(step, batches_idx, n, desc, run_path, checkpoint='last.pt', on_step_time=None):
    """Call step(idx) -> (loss, number correct) on each batch of indices; stop on a NaN/inf loss. Returns (mean loss,
    accuracy in percent) over n samples. on_step_time(k, seconds, steps): told the time of step k = 0 and 1 (read
    after its loss, so the device has finished it; the first includes one-time setup) and the epoch's number of
    steps, e.g. to print the run's estimate.

    The steps' work stays on the device: the losses are read (one host sync, stop_if_non_finite) at the first step,
    every CHECK_EVERY steps and at the end, and the sums once at the end (epoch_means); nothing in between waits."""
    total, correct, losses, first = 0.0, 0, [], 0
    mark = time.perf_counter()
    for i, idx in enumerate(progress(batches_idx, desc=desc)):
        loss, hits = step(idx)
        losses.append(loss)
        total = total + loss * len(idx)
        correct = correct + hits
        timed = on_step_time is not None and i <= 1
        if i % CHECK_EVERY == 0 or timed:
            stop_if_non_finite(losses, first, desc, run_path, checkpoint)  # a timed step: read when it is done
            losses, first = [], i + 1
        if timed:
            now = time.perf_counter()
            on_step_time(i, now - mark, len(batches_idx))
            mark = time.perf_counter()  # the callback's own time (a log line) is not the next step's
    stop_if_non_finite(losses, first, desc, run_path, checkpoint)
    return epoch_means(total, correct, n, desc, run_path, checkpoint)


def duration(seconds):
    """'45 s', '12 min', '3.4 h', '2.1 days' for the console."""
    if seconds < 90:
        return f'{seconds:.0f} s'
    if seconds < 90 * 60:
        return f'{seconds / 60:.0f} min'
    if seconds < 48 * 3600:
        return f'{seconds / 3600:.1f} h'
    return f'{seconds / 86400:.1f} days'


def estimate_line(what, seconds, steps, epochs):
    """The phase's estimated total from one step's time (epochs x steps x seconds), for the console."""
    return (f'{what}: {epochs} epoch{"s" if epochs != 1 else ""} x {steps} step{"s" if steps != 1 else ""} x '
            f'{seconds:.2f} s = about {duration(epochs * steps * seconds)} (without evaluation)')


def step_time_logger(log, what, epochs):
    """An on_step_time for run_epoch: logs the first step's time (with one-time setup: memory, oneDNN or cuDNN
    kernels), then the phase's estimate from the second step (from the first when an epoch has one step)."""
    def on_step_time(k, seconds, steps):
        if k == 0:
            log(f'{what}: first step {seconds:.2f} s (with one-time setup)'
                + ('; timing the next one for the estimate' if steps > 1 else ''))
        if k == 1 or steps == 1:
            log(estimate_line(what, seconds, steps, epochs))
    return on_step_time


CPU_SIZED_S = 3600.0  # on a CPU, a run estimated longer than this gets the GPU-sized notice and the tiny command


def forward_seconds(model, cube, device):
    """(wall, CPU) seconds of one cube's forward pass, the unit of cpu_estimate: eval mode, no gradients, a zero input
    (no random number drawn, no batch-norm statistics changed: the run computes what it would without it)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 1, cube, cube, cube, device=device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(x)
    model.train(was_training)
    return time.perf_counter() - t0, time.process_time() - c0


def cpu_estimate(model, cube, device, phases, eval_cubes, tiny_command, log):
    """Before the first step on a CPU: a rough estimate of the run from one cube's timed forward pass, and for a run
    longer than CPU_SIZED_S the note that its settings are sized for a GPU, with a command that finishes in minutes.
    phases: (name, epochs, steps, cubes per step, forward passes per cube in a step; a forward and its backward
    count about 3); eval_cubes: cubes evaluated per epoch. Returns the estimated seconds."""
    log('DEVICE=cpu: timing one cube\'s forward pass for a rough estimate of the run (with GPU-sized settings this '
        'takes a minute or more, and one training step many minutes)')
    fwd, cpu = forward_seconds(model, cube, device)
    if fwd < 5:  # where it is cheap, a second pass: the first one includes one-time setup (oneDNN's kernels)
        fwd, cpu = forward_seconds(model, cube, device)
    busy = (f', {cpu:.0f} s of it on this process\'s CPU: other work slows this machine' if cpu < 0.5 * fwd
            and fwd > 1 else '')
    parts = [f'{name} step about {duration(passes * cubes * fwd)} ({cubes} cubes x {passes:g} passes)'
             for name, epochs, steps, cubes, passes in phases if epochs > 0]
    total = sum(epochs * steps * cubes * passes * fwd for _, epochs, steps, cubes, passes in phases)
    total += sum(epochs for _, epochs, *_ in phases) * eval_cubes * fwd
    log(f'rough estimate on this CPU from one cube\'s forward pass ({fwd:.2f} s{busy}; its backward counts 2 more): '
        + ', '.join(parts) + f'; the whole run about {duration(total)} with evaluation (the steps are timed as they '
        'run)')
    if total > CPU_SIZED_S:
        log(f'these settings are sized for a GPU: on a CPU they take about {duration(total)}; a run that finishes '
            f'in minutes on a CPU (a tiny network on one fold; its numbers mean nothing):\n  {tiny_command}')
    return total


def stop_if_non_finite(losses, first, desc, run_path, checkpoint):
    """Read the losses (0-dim tensors) of steps first, first + 1, ... in one host sync; at the first NaN/inf one, stop
    as check_finite does, naming that step."""
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses))
    if bool(finite.all()):
        return
    k = int(torch.argmin(finite.int()))  # the first False
    check_finite(losses[k], f'{desc} step {first + k}', run_path, checkpoint)


def epoch_means(total, correct, n, desc, run_path, checkpoint):
    """(mean loss, accuracy in percent) from the device sums, read once at the end of an epoch."""
    check_finite(total, desc, run_path, checkpoint)
    return float(total) / n, 100.0 * float(correct) / n


@torch.no_grad()
def evaluate(model, data, batch_size, where='evaluation', run_path=None, checkpoint='last.pt'):
    """Loss, metrics (percent) and malignancy probabilities of a model on CubeData, without augmentation.
    A NaN/inf loss or probability (weights that broke after the last checked training step) stops the run as
    check_finite does, naming `where` and the kept checkpoint run_path/checkpoint."""
    was_training = model.training
    model.eval()
    losses, probs = [], []
    for idx in batches(len(data), batch_size, shuffle=False, device=data.device):
        x, y = data.eval_batch(idx)
        logits = model(x)
        losses.append(F.cross_entropy(logits, y, reduction='sum'))
        probs.append(F.softmax(logits.float(), dim=1)[:, 1])
    model.train(was_training)
    prob = torch.cat(probs)
    loss = torch.stack(losses).sum()
    check_finite(loss if bool(torch.isfinite(prob).all()) else float('nan'), where, run_path, checkpoint)
    prob = prob.cpu().numpy()
    labels = data.labels.cpu().numpy()
    out = {'loss': float(loss) / len(data), **binary_metrics(labels, prob)}
    out['prob'] = prob
    return out


def save_state(path, epoch, cfg, gen, objects, **extra):
    """Checkpoint: state_dicts of `objects` (name -> object), epoch, config, every RNG state and `extra`;
    written atomically."""
    state = {name: obj.state_dict() for name, obj in objects.items()}
    state.update(epoch=epoch, config=cfg, rng=rng_states(), gen=gen.get_state(), **extra)
    save_atomic(state, path)


def load_state(path, gen, objects):
    """Restore a checkpoint written by save_state into the given objects; returns it."""
    state = load_checkpoint(path)
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except torch.cuda.OutOfMemoryError:
            raise
        except (KeyError, RuntimeError, ValueError) as e:  # e.g. written by a version with other layers
            first = str(e).strip().partition('\n')[0]
            raise UserError(f'checkpoint {path}: its {name} does not fit this code ({first}); '
                            'it may come from an older version: start a new run') from None
    set_rng_states(state['rng'])
    gen.set_state(state['gen'])
    return state


def kept_auc(keep):
    """ROC AUC (percent) of the predictions collected by train_step's `keep`; NaN with one class only."""
    if not keep:
        return float('nan')
    prob, y = (torch.cat(t).cpu().numpy() for t in zip(*keep))
    return binary_metrics(y, prob)['auc']


def class_balance(labels):
    """'n (benign/malignant)' for logs."""
    labels = np.asarray(labels)
    return f'{len(labels)} ({int((labels == 0).sum())}/{int((labels == 1).sum())})'


def edge_leaders(w, primitives):
    """One log line's worth per cell: for each edge (rows of W = op weight x edge weight, as the genotype reads them)
    its leading op, its W and its lead over the next op, with the digits that tell edges apart early in a search
    (every W within 0.001 of 0.25): '0 sep_conv_3x3x3 0.2513 +1.2e-03'."""
    top = torch.topk(torch.as_tensor(w, dtype=torch.float64), min(2, w.shape[1]), dim=1)
    rows = []
    for e, (values, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        lead = values[0] - values[1] if len(values) > 1 else float('nan')
        rows.append(f'{e} {primitives[index[0]]} {values[0]:.4f} +{lead:.1e}')
    return ' | '.join(rows)
