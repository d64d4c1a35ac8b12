"""TensorBoard event files of a run (the scripts' TENSORBOARD setting): `tensorboard --logdir runs` shows every run's
curves, the search's op weights and genotypes and the figures, and compares runs side by side.

Values are written at epoch (generation) ends from numbers the loop already holds on the host, then flushed: a step
never waits for this. The tensorboard package is imported when a Board opens, never at import: --help and prepare.py's
scan workers never load it (tests/test_console.py, tests/test_scan_worker.py).

A resumed run continues its event stream: before the writer opens, the events of steps from `start` on (a kill may
have left some) are dropped from the folder's event files, so no step is written twice and none is missing; the
writer's purge_step marks the restart for a TensorBoard that was already reading the folder."""
import glob
import importlib.util
import math
import numbers
import os
import struct
import weakref

from utils import UserError, atomic_path

EVENTS = 'events.out.tfevents.*'  # the file names TensorBoard reads
SPLITS = ('train', 'val', 'test')  # metrics.csv columns <split>_<metric> become the tags <metric>/<split>


def installed():
    """Is the tensorboard package there? (Found without importing it.)"""
    return importlib.util.find_spec('tensorboard') is not None


def check(on):
    """The rule of the TENSORBOARD setting (settings.RULE_FUNCTIONS): on needs the package."""
    if on and not installed():
        raise UserError('TENSORBOARD=True: the tensorboard package is not installed (pip install tensorboard); '
                        'or give --TENSORBOARD=False')
    return True


def tag_of(column):
    """The TensorBoard tag of a metrics CSV column: 'val_loss' -> 'loss/val' (one section per metric, the splits
    side by side); other columns keep their name ('lr', 'seconds')."""
    split, _, metric = column.partition('_')
    return f'{metric}/{split}' if split in SPLITS and metric else column


def keep_before(folder, start):
    """Drop the events of steps >= start from the event files directly in `folder`: those before are merged into the
    first file (rewritten atomically), the other files deleted; start 0 deletes them all."""
    files = sorted(glob.glob(os.path.join(glob.escape(folder), EVENTS)))
    if start > 0 and files:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        kept = [r for path in files for r in RawEventFileLoader(path).Load() if Event.FromString(r).step < start]
        with atomic_path(files[0]) as tmp, open(tmp, 'wb') as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
        files = files[1:]
    for path in files:
        os.remove(path)


class Board:
    """The event stream of one folder; every method does nothing when TensorBoard is off."""

    def __init__(self, folder, on=True, start=0):
        self.writer = None
        if not on:
            return
        os.makedirs(folder, exist_ok=True)
        keep_before(folder, start)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(folder, purge_step=start or None)
        weakref.finalize(self, self.writer.close)  # a run that stops on an error or Ctrl-C: flushed and closed

    def __bool__(self):
        return self.writer is not None

    def scalars(self, values, step, prefix=''):
        """One scalar per number of `values` (a metrics CSV row: its 'epoch' is the step, not a value)."""
        for name, value in values.items():
            if self and name != 'epoch' and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + tag_of(name), float(value), step)

    def text(self, tag, text, step):
        if self:
            self.writer.add_text(tag, text, step)

    def image(self, tag, png_path, step):
        """A PNG file as it is (no decoding): its size from the header."""
        if not self or not os.path.exists(png_path):
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        with open(png_path, 'rb') as f:
            png = f.read()
        width, height = struct.unpack('>II', png[16:24])  # the IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def figures(self, png_paths, step):
        for path in png_paths:
            self.image('figures/' + os.path.splitext(os.path.basename(path))[0], path, step)

    def hparams(self, settings, metrics, step):
        """The run's settings with its final metrics, for TensorBoard's HPARAMS view (filter and compare runs)."""
        if not self:
            return
        from torch.utils.tensorboard.summary import hparams
        # numbers as numbers (ranges to filter by), anything else as text (torch would show a bool as 0 or 1)
        plain = {k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v)
                 for k, v in settings.items()}
        for summary in hparams(plain, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self):
        if self:
            self.writer.flush()

    def close(self):
        if self:
            self.writer.close()


def markdown_code(text):
    """Text shown as written (TensorBoard renders text as Markdown: op names hold underscores)."""
    return '\n'.join('    ' + line for line in str(text).splitlines())


# ---------------------------------------------------------------- train_search.py

def search_board(folder, on, model, arch_optimizer, start):
    """The search's board; a new stream gets the layout that draws each edge's op weights in one chart. Each
    architecture step leaves a device copy of its hypergradient (the alphas' and betas' .grad as the optimizer gets
    them; the weight steps add to .grad afterwards): a few tiny copies, no host sync; read at the epoch's end."""
    board = Board(folder, on, start)
    if not board:
        return board

    def keep_hypergradient(optimizer, args, kwargs):
        board.hypergradient = [p.grad.detach().clone() for group in optimizer.param_groups for p in group['params']
                               if p.grad is not None]
    board.hypergradient = None
    arch_optimizer.register_step_pre_hook(keep_hypergradient)
    if start == 0:
        from figures.search import edge_label
        n_edges = model.alphas_normal.shape[0]
        board.writer.add_custom_scalars({
            f'op weights, {cell} cell': {f'edge {e}: {edge_label(e).replace("$", "")}': [
                'Multiline', [f'^op_weights_{cell}/edge{e:02d}/']] for e in range(n_edges)}
            for cell in ('normal', 'reduce')})
    return board


def search_epoch(board, epoch, row, model, updater, genotype):
    """The epoch's metrics.csv row, op and edge weights (weights.csv), the sparsemax temperature, the zero-one loss,
    the norm of the epoch's last architecture step's hypergradient, the genotype."""
    if not board:
        return
    import torch

    from model_search import zero_one_loss
    board.scalars(row, epoch)
    with torch.no_grad():
        for cell in ('normal', 'reduce'):
            ops = model.op_weights(getattr(model, f'alphas_{cell}')).cpu()
            edges = model.edge_weights(getattr(model, f'betas_{cell}')).cpu()
            for e in range(ops.shape[0]):
                board.writer.add_scalar(f'edge_weights_{cell}/edge{e:02d}', float(edges[e]), epoch)
                for k, name in enumerate(model.primitives):
                    board.writer.add_scalar(f'op_weights_{cell}/edge{e:02d}/{name}', float(ops[e, k]), epoch)
        if model.weighting == 'sparsemax':
            board.writer.add_scalar('search/temperature', float(model.tau), epoch)
        if updater.zero_one != 'off':
            board.writer.add_scalar('search/zero_one_loss', float(zero_one_loss(model, updater.zero_one)), epoch)
        if board.hypergradient:  # none before the first architecture step (warm-up)
            norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in board.hypergradient))
            board.writer.add_scalar('search/hypergradient_norm', norm, epoch)
            board.hypergradient = None  # an epoch without architecture steps (ZO_T) shows none
    board.text('genotype', markdown_code(genotype), epoch)
    board.flush()


def search_end(board, step, genotype, best, figures):
    """After the last epoch (step: the epochs done): the final and best genotypes, the figures drawn."""
    if not board:  # off, or None: finish() called without one
        return
    board.text('genotype/final', markdown_code(genotype), step)
    if best['genotype'] is not None:
        board.text('genotype/best', markdown_code(f'epoch {best["epoch"]}, search-val acc {best["acc"]:.2f}:\n'
                                                  f'{best["genotype"]}'), step)
    board.figures(figures, step)
    board.close()


# ---------------------------------------------------------------- train_3D_continuation.py

def retrain_end(folder, on, cfg, results, figures):
    """The run's own stream (the folds' curves are in its fold<f>/ folders), rewritten at each end: the results
    tables, the figures, and the settings with the mean final test metrics (HPARAMS view)."""
    from utils import METRIC_NAMES, results_table
    board = Board(folder, on, 0)
    step = cfg['EPOCHS']
    board.text('results/final_epoch', markdown_code(results_table(results, extra=('params_M',))), step)
    board.text('results/best_epoch', markdown_code(results_table([r['best'] for r in results], extra=('epoch',))),
               step)
    board.figures(figures, step)
    board.hparams({k: v for k, v in cfg.items() if k != 'RESUME'},
                  {f'final/test_{k}': sum(r[k] for r in results) / len(results) for k in METRIC_NAMES}, step)
    board.close()


# ---------------------------------------------------------------- train_evolve.py

CANDIDATE_NUMBERS = ('f1', 'f2', 'params', 'm_train', 'm_val', 'acc_val', 'auc_val', 'val_loss', 'e_best', 'epochs',
                     'seconds')  # evaluations.csv columns shown per candidate (step: its index)


def evolve_candidate(board, row):
    """A trained candidate (step: its index): its metrics and, as text, its genome and what it decodes to."""
    if not board:
        return
    for name in CANDIDATE_NUMBERS:
        value = row.get(name)
        if isinstance(value, numbers.Real) and not (isinstance(value, float) and math.isnan(value)):
            board.writer.add_scalar(f'candidate/{name}', float(value), row['index'])
    board.text('candidate', markdown_code(
        f'generation {row["generation"]} {row["phase"]}, genome {list(row["genome"])}: C={row["C"]} '
        f'cells={row["cells"]} lr={row["lr"]:g}{" (diverged)" if row["diverged"] else ""}\n{row["genotype"]}'),
        row['index'])
    board.flush()  # a candidate trains for minutes: an interrupted generation keeps those done


def evolve_generation(board, g, hypervolume, archive, members, pareto_png):
    """After generation g: the hypervolume, the front's size, the front as drawn in pareto.png."""
    if not board:
        return
    board.writer.add_scalar('search/hypervolume', hypervolume, g)
    board.writer.add_scalar('search/front_size', len(members), g)
    board.writer.add_scalar('search/evaluated', len(archive), g)
    board.image('front', pareto_png, g)
    board.flush()


def evolve_end(board, step, archive, members):
    """The final front's members as a table (step: GENERATIONS)."""
    lines = ['| candidate | f1 | M params | C | cells | lr | genome |', '|---|---|---|---|---|---|---|']
    lines += [f'| {i} | {archive[i]["f1"]:.4f} | {archive[i]["params"] / 1e6:.3f} | {archive[i]["C"]} | '
              f'{archive[i]["cells"]} | {archive[i]["lr"]:g} | {" ".join(map(str, archive[i]["genome"]))} |'
              for i in members]
    board.text('front', '\n'.join(lines), step)
    board.close()
