"""runfolder: atomic checkpoints, damaged checkpoints, random states."""
import os

import pytest
import torch

import runfolder
from utils import UserError

# ---------------------------------------------------------------- checkpoints

def test_save_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / 'last.pt')
    runfolder.save_atomic({'w': torch.arange(3)}, path)
    runfolder.save_atomic({'w': torch.arange(4)}, path)
    assert torch.equal(runfolder.load_checkpoint(path)['w'], torch.arange(4))
    assert os.listdir(tmp_path) == ['last.pt']


def test_save_atomic_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    runfolder.save_atomic({'w': torch.arange(3)}, path)

    def half_written(obj, f):
        with open(f, 'wb') as out:
            out.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', half_written)
    with pytest.raises(OSError, match='disk full'):
        runfolder.save_atomic({'w': torch.arange(4)}, path)
    monkeypatch.undo()
    assert torch.equal(runfolder.load_checkpoint(path)['w'], torch.arange(3))
    assert os.listdir(tmp_path) == ['last.pt']


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        runfolder.load_checkpoint(str(tmp_path / 'nope.pt'))
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='bad.pt cannot be read'):
        runfolder.load_checkpoint(str(bad))


def test_rng_states_round_trip():
    runfolder.seed_everything(1)
    state = runfolder.rng_states()
    a = torch.rand(3)
    torch.rand(5)
    runfolder.set_rng_states(state)
    assert torch.equal(torch.rand(3), a)
