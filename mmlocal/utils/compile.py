"""An opt-in ``torch.compile`` of static-shape parts of a training step.

A local step on a GPU with few images is bound by kernel launches and host
work more than by FLOPs (``tools/analysis/count_ops.py``): an auxiliary
net's convolutions or a RepL block's weight synthesis are dozens of small
kernels each. Their shapes do not change from one iteration to the next
(fixed input size), so ``torch.compile`` can fuse them (inductor's
default mode; on CUDA, ``mode='reduce-overhead'`` also captures them as CUDA
graphs, where one launch replays a whole part). Parts whose shapes depend on
the data (ground-truth counts, anchor targets, losses) stay eager.

**CUDA graphs and local learning.** PyTorch's CUDA-graph trees take a new
forward after a backward for the next iteration and reuse the memory of the
previous outputs, gradients included. A local step runs K-1 aux nets'
forward and backward one after another before the optimizer step, so with
``mode='reduce-overhead'`` the second aux net's replay overwrites the first
one's parameter gradients: on an H200 (torch 2.11) MAN K=4 failed at the
optimizer step with "accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run". So the default never uses CUDA graphs, and
the aux nets (:class:`~mmlocal.models.local.aux.base.BaseLocalAux`) reject
that mode (``check_compile_option(..., cudagraphs=False)``); RepL's
synthesis, computed once per forward, may ask for it.

Use:

- :func:`check_compile_option` normalises a config value (``False`` /
  ``None``: off; ``True``: on with the defaults; a dict: ``torch.compile``
  keyword arguments, e.g. ``dict(backend='aot_eager')`` or
  ``dict(mode='max-autotune')``) and raises a ``ValueError`` naming the
  option otherwise;
- :class:`CompiledMethods` is kept on a module and runs its methods through
  ``torch.compile`` (or eagerly when off): ``self._compiled('forward', x)``.
  The compiled callable is made at the first call, with inductor's default
  mode unless a ``mode`` or ``backend`` is given, and ``dynamic=False``
  unless given (static shapes: a new input size compiles once more).

A copy of the module (``copy.deepcopy``, pickling) gets an empty store, so
it compiles its own methods rather than calling the original's. Dynamo
caches one graph per module instance and code object; more than
``torch._dynamo.config.cache_size_limit`` (default 8) instances of one class
(e.g. K-1 > 8 auxiliary nets) fall back to eager for the rest with a
warning from PyTorch; raise that limit for such splits.

Gradients and values equal the eager ones up to floating-point
reassociation (``tests/test_compile_option.py``). Off by default: measure a
step (``tools/device/run_benchmarks.sh``) before turning it on; compiling
costs seconds to minutes at the first iteration.
"""
import torch

#: ``torch.compile`` keyword arguments a config may set
COMPILE_KWARGS = ('backend', 'mode', 'fullgraph', 'dynamic', 'options',
                  'disable')


def check_compile_option(value, name='compile', cudagraphs=True):
    """``None`` (off) or the ``torch.compile`` kwargs a value asks for.

    Args:
        value (bool | dict | None): ``False``/``None`` off, ``True`` on with
            the defaults, a dict of ``torch.compile`` keyword arguments.
        name (str): The option's name for the error message.
        cudagraphs (bool): Whether the caller may run under CUDA graphs;
            ``False`` rejects ``mode='reduce-overhead'`` and inductor's
            ``triton.cudagraphs`` option (see the module docstring).
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        bad = sorted(set(value) - set(COMPILE_KWARGS))
        if bad:
            raise ValueError(f'{name}={value!r}: unknown keys {bad}; allowed '
                             f'{list(COMPILE_KWARGS)}')
        if not cudagraphs and (
                value.get('mode') == 'reduce-overhead' or
                (value.get('options') or {}).get('triton.cudagraphs')):
            raise ValueError(
                f'{name}={value!r}: CUDA graphs cannot run the aux nets of '
                'a local step (each aux net\'s replay overwrites the '
                'previous one\'s gradients before the optimizer step); use '
                'the default mode or e.g. mode=\'max-autotune-no-cudagraphs\'')
        return dict(value)
    raise ValueError(f'{name}={value!r} must be True, False, None or a dict '
                     'of torch.compile arguments')


def compile_kwargs(options):
    """``torch.compile`` kwargs for ``options``: ``dynamic=False`` unless
    given (inductor's default mode: no CUDA graphs unless asked for)."""
    kwargs = dict(options)
    kwargs.setdefault('dynamic', False)
    return kwargs


class CompiledMethods:
    """Methods of one object run through ``torch.compile`` when enabled.

    Args:
        owner (object): Whose methods are called (usually an ``nn.Module``;
            not stored: pass it at each call so copies stay independent).
        options (dict | None): From :func:`check_compile_option`; ``None``
            runs every call eagerly.

    ``store(owner, 'name', *args)`` calls ``owner.name(*args)``, compiled
    at the first call per name.
    """

    def __init__(self, options=None):
        self.options = options
        self._fns = {}

    @property
    def enabled(self):
        return self.options is not None

    def __call__(self, owner, name, *args, **kwargs):
        method = getattr(owner, name)
        if self.options is None:
            return method(*args, **kwargs)
        key = (id(owner), name)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = torch.compile(
                method, **compile_kwargs(self.options))
        return fn(*args, **kwargs)

    # a copy compiles its own owner's methods
    def __deepcopy__(self, memo):
        return CompiledMethods(self.options)

    def __getstate__(self):
        return {'options': self.options, '_fns': {}}

    def __repr__(self):
        return f'CompiledMethods(options={self.options!r})'
