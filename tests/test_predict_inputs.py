"""predict.py's inputs that are not what it needs, each one line with the remedy, which then works: a run folder on
a read-only file system (--OUT= elsewhere), a damaged genotype.json (deleted: the run's GENOTYPE setting)."""
import errno
import os
import shutil

import numpy as np
import pytest
from test_predict import RETRAIN, cubes, finished  # noqa: F401 - the tiny finished retrain run (module fixtures)

import predict
import runfolder
from utils import UserError


def test_read_only_run_folder_names_the_folder_and_out(finished, tmp_path, monkeypatch):  # noqa: F811
    run = str(shutil.copytree(finished, tmp_path / 'run'))
    real = os.makedirs

    def read_only(path, *args, **kw):  # the run folder's file system is mounted read-only (root ignores chmod)
        if os.path.abspath(path).startswith(run + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *args, **kw)
    monkeypatch.setattr(runfolder.os, 'makedirs', read_only)
    before = sorted(os.listdir(run))
    with pytest.raises(UserError) as info:
        predict.main(RUN=run, DEVICE='cpu')
    message = str(info.value)
    assert message.startswith(f'cannot write the output folder {run}/predict-')
    assert message.endswith(f'(Read-only file system): give --OUT=<a writable folder> to write it there instead of '
                            f'in {run}') and '\n' not in message
    assert sorted(os.listdir(run)) == before
    out = predict.main(RUN=run, DEVICE='cpu', OUT=str(tmp_path / 'elsewhere'))  # the remedy
    assert os.path.dirname(out['run']) == str(tmp_path / 'elsewhere')
    assert os.path.isfile(os.path.join(out['run'], 'predictions.csv'))


def test_damaged_genotype_says_what_to_do_which_works(finished, tmp_path):  # noqa: F811
    run = str(shutil.copytree(finished, tmp_path / 'run'))
    good = predict.main(RUN=run, DEVICE='cpu')['predictions']
    path = os.path.join(run, 'genotype.json')
    with open(path) as f:
        text = f.read()
    with open(path, 'w') as f:
        f.write(text[:len(text) // 2])  # cut short
    with pytest.raises(UserError) as info:
        predict.main(RUN=run, DEVICE='cpu')
    message = str(info.value)
    assert message.startswith(f'genotype file {path}: cannot read json (')
    assert message.endswith(f': copy the genotype.json of the search that gave this run over it, or delete it to use '
                            f"the GENOTYPE='NAS_HBO_PAPER' of {run}/config.json") and '\n' not in message
    os.remove(path)  # the remedy
    again = predict.main(RUN=run, DEVICE='cpu')['predictions']
    np.testing.assert_allclose(again['prob_mean'], good['prob_mean'], rtol=1e-6)
