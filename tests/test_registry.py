"""Every registered mmlocal name builds under mmdet's and mmseg's scope."""
import subprocess
import sys

import pytest
from mmengine.registry import DefaultScope

import mmlocal.registry as R
from conftest import REPO
from tool_server import run_tool_fast


# Minimal build arguments of every registered name live in
# tests/build_cfgs_*.py; a registered class without an entry there fails
# `test_every_registered_name_has_a_build_cfg`.
def _collect_build_cfgs():
    """Merge ``BUILD_CFGS`` of every ``tests/build_cfgs_*.py`` file.

    Each component family keeps the minimal build arguments of its
    registered names in its own file (values are callables returning the
    kwargs), so adding a family never edits this test.
    """
    import glob
    import importlib
    import os.path as osp
    merged = {}
    for path in sorted(glob.glob(osp.join(osp.dirname(__file__),
                                          'build_cfgs_*.py'))):
        mod = importlib.import_module(osp.basename(path)[:-3])
        overlap = set(merged) & set(mod.BUILD_CFGS)
        assert not overlap, f'{path} redefines {overlap}'
        merged.update(mod.BUILD_CFGS)
    return merged


BUILD_CFGS = _collect_build_cfgs()

REGISTRY_NAMES = [
    name for name in dir(R)
    if isinstance(getattr(R, name), R.Registry)
    and not name.startswith('MMENGINE')
]


def _registered():
    found = []
    for reg_name in REGISTRY_NAMES:
        registry = getattr(R, reg_name)
        registry.import_from_location()
        found += [(reg_name, key) for key in registry.module_dict]
    return found


def test_all_registries_are_mmlocal_children_of_mmengine_roots():
    import mmengine.registry as root
    for reg_name in REGISTRY_NAMES:
        registry = getattr(R, reg_name)
        assert registry.scope == 'mmlocal', reg_name
        assert registry.parent is getattr(root, reg_name), reg_name
        assert registry.parent.scope == 'mmengine'
        # every location is importable (a failed import would be swallowed
        # by mmengine and reported as "not in the registry")
        for loc in registry._locations:
            __import__(loc)


def test_every_registered_name_has_a_build_cfg():
    from build_cfgs_pipeline import NEEDS_PROCESS_GROUP
    missing = sorted(set(_registered()) - set(BUILD_CFGS)
                     - NEEDS_PROCESS_GROUP)
    assert not missing, f'add build args to BUILD_CFGS for {missing}'


def test_wrappers_that_need_a_process_group_build_in_one():
    """Registered names that can only be built inside a process group
    (``NEEDS_PROCESS_GROUP``) build with the ``mmlocal.`` prefix under
    mmdet's scope in a fresh one-process gloo group."""
    from build_cfgs_pipeline import NEEDS_PROCESS_GROUP
    assert NEEDS_PROCESS_GROUP <= set(_registered())
    names = sorted(name for _, name in NEEDS_PROCESS_GROUP)
    code = f"""
import socket
import torch.distributed as dist
from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope, MODEL_WRAPPERS, MODELS
import mmdet.registry  # noqa: F401
from local_utils import TINY_RETINANET, small_aux
with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{{port}}',
                        rank=0, world_size=1)
with DefaultScope.overwrite_default_scope('mmdet'):
    for name in {names!r}:
        learner = MODELS.build(dict(
            type='mmlocal.LocalLearner', model=ConfigDict(TINY_RETINANET),
            num_modules=2, aux=small_aux()))
        obj = MODEL_WRAPPERS.build(dict(type='mmlocal.' + name,
                                        module=learner))
        assert type(obj).__name__ == name and obj.module is learner
dist.destroy_process_group()
print('OK')
"""
    proc = run_tool_fast(['-c', code], cwd=f'{REPO}/tests', check=False,
                         timeout=300)
    assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('key', sorted(BUILD_CFGS))
def test_builds_with_scope_prefix(scope, key):
    import importlib
    importlib.import_module(f'{scope}.registry')
    reg_name, name = key
    root = getattr(importlib.import_module('mmengine.registry'), reg_name)
    with DefaultScope.overwrite_default_scope(scope):
        obj = root.build(dict(type=f'mmlocal.{name}', **BUILD_CFGS[key]()))
    assert type(obj).__name__ == name
    assert type(obj) is getattr(R, reg_name).get(name)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_resolves_in_fresh_process_without_custom_imports(scope):
    """`type='mmlocal.X'` resolves from a stock config scope although
    mmlocal was never imported (lazy `locations`)."""
    code = f"""
import sys
from mmengine.registry import HOOKS, init_default_scope
init_default_scope('{scope}')
assert 'mmlocal' not in sys.modules
hook = HOOKS.build(dict(type='mmlocal.PeakMemoryHook', interval=3))
assert type(hook).__module__.startswith('mmlocal.'), type(hook)
assert hook.interval == 3
print('OK')
"""
    # the tool server's process has imported torch and mmengine, never
    # mmlocal, mmdet or mmseg (tests/tool_server.py)
    proc = run_tool_fast(['-c', code], cwd='/', check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'OK' in proc.stdout


def test_unscoped_name_needs_prefix_under_mmdet_scope():
    """Documented behaviour: a sibling scope needs the `mmlocal.` prefix."""
    from mmengine.registry import HOOKS
    import mmdet.registry  # noqa: F401
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(KeyError, match='PeakMemoryHook'):
            HOOKS.build(dict(type='PeakMemoryHook'))


def test_register_all_modules_sets_scope():
    import sys
    from mmlocal.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    assert R.HOOKS.get('PeakMemoryHook') is not None
    assert 'mmlocal' in sys.modules


def test_package_import_is_light():
    code = ('import sys, mmlocal; heavy = [m for m in ("torch", "mmdet", '
            '"mmseg", "mmengine") if m in sys.modules]; print(heavy)')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'


def test_no_empty_package():
    """Every mmlocal package holds code (a package with only a comment in
    its ``__init__.py`` promises an API that does not exist)."""
    import ast
    import os
    import os.path as osp
    root = osp.join(REPO, 'mmlocal')
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != '__pycache__']
        if '__init__.py' not in filenames:
            continue
        modules = [f for f in filenames
                   if f.endswith('.py') and f != '__init__.py']
        with open(osp.join(dirpath, '__init__.py')) as f:
            body = ast.parse(f.read()).body
        assert modules or dirnames or body, \
            f'{osp.relpath(dirpath, REPO)} is an empty package'
