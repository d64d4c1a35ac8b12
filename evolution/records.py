"""What the evolutionary search writes as it goes: evaluations.csv (a row per trained candidate, appended), and after
each evaluation pareto.csv, pareto.png and front/<candidate>.json (a genotype file per front member that
train_3D_continuation.py retrains with the member's channels, cells and learning rate)."""
import csv
import math
import os

import genotypes
import utils
from evolution import samea as sm

COLUMNS = ('index', 'generation', 'phase', 'subproblem', 'screening', 'genome', 'genotype', 'C', 'cells', 'lr',
           'params', 'f1', 'f2', 'm_train', 'm_val', 'acc_val', 'auc_val', 'val_loss', 'malignant_val', 'e_best',
           'epochs', 'diverged', 'seconds', 'predicted_f1', 'predicted_std')
FRONT_COLUMNS = ('index', 'generation', 'f1', 'f2', 'params', 'C', 'cells', 'lr', 'm_val', 'acc_val', 'auc_val',
                 'diverged', 'genotype_file')  # diverged: a member only by its size (its f1 is the worst)


def _cell(value):
    if isinstance(value, float):
        return '' if math.isnan(value) else f'{value:.6g}'
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return ' '.join(map(str, value))  # a genome
    return value


def front_file(run, idx):
    return run.file(os.path.join('front', f'candidate_{idx:04d}.json'))


def constant_prediction(row):
    """'benign' or 'malignant' when a candidate predicted that class for every search-val nodule in the epochs its
    metrics average (malignant_val: the share predicted malignant, 0 or 1); '' otherwise or when diverged."""
    share = row.get('malignant_val', float('nan'))
    if row.get('diverged') or not isinstance(share, float) or math.isnan(share) or 0.0 < share < 1.0:
        return ''
    return 'malignant' if share == 1.0 else 'benign'


class Outputs:
    def __init__(self, run, cfg):
        self.run, self.cfg = run, cfg

    def evaluated(self, archive):
        """After each evaluation: append its row, rewrite the front's files and figure."""
        r = archive[-1]
        self.run.metrics_row({k: _cell(r.get(k, '')) for k in COLUMNS}, 'evaluations.csv')
        tail = (f', surrogate predicted f1 {r["predicted_f1"]:.3f} ± {r["predicted_std"]:.3f} ({r["screening"]})'
                if 'predicted_f1' in r else '')
        sub = f', subproblem {r["subproblem"]}' if r['subproblem'] != '' else ''
        self.run.log(f'  candidate {r["index"]} (gen {r["generation"]} {r["phase"]}{sub}): '
                     f'C={r["C"]} cells={r["cells"]} lr={r["lr"]:g} {r["params"] / 1e6:.3f} M params, f1 '
                     f'{r["f1"]:.4f}{" (diverged)" if r["diverged"] else ""}, search-val {self.cfg["METRIC"]} '
                     f'{100 * r["m_val"]:.1f}%, {r["epochs"]} epochs, {r["seconds"]:.1f} s{tail}')
        one_class = constant_prediction(r)
        if one_class:
            self.run.log(f'  candidate {r["index"]} predicts one class only: every search-val nodule {one_class} '
                         f'over its last {self.cfg["LAST_EPOCHS"]} epoch(s) (a constant predictor; its accuracy is '
                         "the class share, its f1 says nothing about the architecture)")
        members = sm.front([[a['f1'], a['f2']] for a in archive]).tolist()
        members.sort(key=lambda i: archive[i]['f2'])
        self.write_front(archive, members)
        from figures import search
        from figures.common import run_name
        search.plot_pareto(self.run.file('evaluations.csv'), self.run.file('pareto.png'), run=run_name(self.run.path))

    def write_front(self, archive, members):
        os.makedirs(self.run.file('front'), exist_ok=True)
        keep = set()
        rows = []
        for i in members:
            r = archive[i]
            path = front_file(self.run, i)
            keep.add(os.path.basename(path))
            if not os.path.exists(path):
                # genotype keys + the member's macro settings, which train_3D_continuation.py uses as defaults
                body = {**genotypes.genotype_to_dict(r['genotype']), 'C': r['C'], 'LAYERS': r['cells'],
                        'LR': r['lr'], 'params': r['params'], 'f1': r['f1'], 'search_candidate': i}
                utils.save_json_atomic(path, body)
            rows.append({k: _cell(r.get(k, '')) for k in FRONT_COLUMNS[:-1]} | {'genotype_file': path})
        for name in os.listdir(self.run.file('front')):
            if name not in keep:
                os.remove(os.path.join(self.run.file('front'), name))
        with utils.atomic_path(self.run.file('pareto.csv')) as tmp, open(tmp, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(FRONT_COLUMNS))
            w.writeheader()
            w.writerows(rows)

