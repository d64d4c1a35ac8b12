"""Redraw the figures of a run folder, or draw the cells of any genotype.

python draw.py runs/<run folder>                       every figure the run folder supports, written into it
                                                       (a search, evolutionary search or retrain run)
python draw.py --GENOTYPE=NAS_HBO_PAPER                  the normal and reduction cells of a genotype (runs/cells_*.png)
"""
import console  # first: --help answers from the source, before the heavy imports below

console.help_if_asked(__file__, __name__)
import os
import sys

import settings
import utils
from figures import diagrams, runs

RUN = ''  # a run folder of train_search.py, train_evolve.py or train_3D_continuation.py: its figures are redrawn
GENOTYPE = ''  # a registered genotype name or a genotype.json: its cell diagram is drawn to OUT
OUT = ''  # with GENOTYPE: its PNG ('' = runs/cells_<name>.png); with RUN: the figures' folder ('' = the run folder)
PALETTE = False  # write 256-colour PNGs (about 3x smaller: the README's pictures under docs/)
PNGS = ()  # PNG files made elsewhere (e.g. predict.py's LayerCAM figures) to rewrite in place with the palette
DEFAULTS = settings.settings_of(globals())
RULES = {  # allowed values of the settings above, in their order (settings.check_rules; None: any value of the type)
    'RUN': "RUN == '' or isdir(RUN)", 'GENOTYPE': None, 'OUT': None, 'PALETTE': None, 'PNGS': None,
}


def main(**overrides):
    cfg = settings.resolve(overrides, DEFAULTS, RULES)
    if not cfg['RUN'] and not cfg['GENOTYPE'] and not cfg['PNGS']:
        raise utils.UserError('nothing to draw: give a run folder (python draw.py runs/<folder>) or --GENOTYPE=')
    if cfg['PNGS'] and not cfg['PALETTE']:
        raise utils.UserError('PNGS are only rewritten with PALETTE=True')
    missing = [p for p in cfg['PNGS'] if not os.path.isfile(p)]
    if missing:
        raise utils.UserError(f'PNGS: {", ".join(missing)} not found')
    written = []
    if cfg['RUN'] and cfg['GENOTYPE'] and cfg['OUT']:
        raise utils.UserError('OUT names the PNG of GENOTYPE or the folder of RUN\'s figures: give RUN or GENOTYPE')
    if cfg['RUN']:
        written += runs.draw_run(cfg['RUN'], out_dir=cfg['OUT'] or None)
    if cfg['GENOTYPE']:
        name = os.path.splitext(os.path.basename(cfg['GENOTYPE']))[0]
        out = cfg['OUT'] or os.path.join('runs', f'cells_{name}.png')  # never into the repository's own files
        written.append(diagrams.plot_genotype(cfg['GENOTYPE'], out, title=runs.genotype_title(cfg['GENOTYPE'])))
    for path in written + list(cfg['PNGS']):
        if cfg['PALETTE']:
            runs.to_palette(path)
        print(f'written {path}')
    return written


if __name__ == '__main__':
    # A run folder may be given as the first argument (it would otherwise be read as a config file).
    if len(sys.argv) > 1 and not sys.argv[1].startswith('--') and not sys.argv[1].endswith('.py'):
        sys.argv[1] = f'--RUN={sys.argv[1]}'
    settings.run_cli(main, DEFAULTS, 'rerun the same command')
