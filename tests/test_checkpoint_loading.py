"""Trusted local checkpoint loading on torch >= 2.6 (weights_only default)."""
import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

from mmlocal.utils import checkpoint as ckpt_mod


@pytest.fixture
def runner_like_ckpt(tmp_path):
    """A file shaped like an mmengine resume checkpoint."""
    path = tmp_path / 'iter_2.pth'
    torch.save(
        dict(
            meta=dict(iter=2, seed=np.int64(3)),
            state_dict=dict(w=torch.ones(2)),
            message_hub=dict(
                log_scalars=dict(loss=HistoryBuffer([1.0], [1])))),
        path)
    return str(path)


@pytest.fixture
def restore_loader():
    saved = dict(CheckpointLoader._schemes)
    enabled = ckpt_mod._ENABLED
    yield
    CheckpointLoader._schemes.clear()
    CheckpointLoader._schemes.update(saved)
    ckpt_mod._ENABLED = enabled


def test_stock_loader_rejects_resume_checkpoint(runner_like_ckpt,
                                                restore_loader, monkeypatch):
    """The problem being fixed exists on this torch (guards the premise)."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    from mmengine.runner.checkpoint import load_from_local
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(runner_like_ckpt, map_location='cpu')


def test_trusted_loader_reads_resume_checkpoint(runner_like_ckpt,
                                                restore_loader, monkeypatch):
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    monkeypatch.delenv('MMLOCAL_WEIGHTS_ONLY', raising=False)
    ckpt_mod._ENABLED = False
    assert ckpt_mod.enable_trusted_checkpoints()
    state = _load_checkpoint(runner_like_ckpt, map_location='cpu')
    assert state['meta']['iter'] == 2
    assert isinstance(state['message_hub']['log_scalars']['loss'],
                      HistoryBuffer)
    assert torch.equal(state['state_dict']['w'], torch.ones(2))


def test_opt_out_keeps_weights_only(restore_loader, monkeypatch):
    monkeypatch.setenv('MMLOCAL_WEIGHTS_ONLY', '1')
    ckpt_mod._ENABLED = False
    before = CheckpointLoader._schemes['']
    assert not ckpt_mod.enable_trusted_checkpoints()
    assert CheckpointLoader._schemes[''] is before


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        ckpt_mod.load_trusted_local_checkpoint(str(tmp_path / 'nope.pth'))
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'not a checkpoint' * 10)
    with pytest.raises(RuntimeError, match='corrupt.pth'):
        ckpt_mod.load_trusted_local_checkpoint(str(bad))
    assert os.path.getsize(bad) == 160  # never modified


def test_stock_tools_import_hook(restore_loader, monkeypatch):
    """`custom_imports=['mmlocal.utils.trusted_checkpoints']` enables it."""
    monkeypatch.delenv('MMLOCAL_WEIGHTS_ONLY', raising=False)
    import importlib
    import sys
    ckpt_mod._ENABLED = False
    sys.modules.pop('mmlocal.utils.trusted_checkpoints', None)
    importlib.import_module('mmlocal.utils.trusted_checkpoints')
    assert ckpt_mod.trusted_checkpoints_enabled()
    assert CheckpointLoader._schemes[''] is \
        ckpt_mod.load_trusted_local_checkpoint
