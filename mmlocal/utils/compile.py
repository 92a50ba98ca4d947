"""An opt-in ``torch.compile`` of static-shape parts of a training step.

A local step on a GPU with few images is bound by kernel launches and host
work more than by FLOPs (``tools/analysis/count_ops.py``): an auxiliary
net's convolutions or a RepL block's weight synthesis are dozens of small
kernels each. Their shapes do not change from one iteration to the next
(fixed input size), so ``torch.compile`` can fuse them and, on CUDA,
capture them as CUDA graphs (``mode='reduce-overhead'``): one launch
replays the whole part. Parts whose shapes depend on the data (ground-truth
counts, anchor targets, losses) stay eager.

Use:

- :func:`check_compile_option` normalises a config value (``False`` /
  ``None``: off; ``True``: on with the defaults; a dict: ``torch.compile``
  keyword arguments, e.g. ``dict(backend='aot_eager')`` or
  ``dict(mode='max-autotune')``) and raises a ``ValueError`` naming the
  option otherwise;
- :class:`CompiledMethods` is kept on a module and runs its methods through
  ``torch.compile`` (or eagerly when off): ``self._compiled('forward', x)``.
  The compiled callable is made at the first call, where the device of the
  first tensor argument picks the default mode: ``'reduce-overhead'``
  (CUDA graphs) on CUDA, inductor's default elsewhere; an explicit ``mode``
  or ``backend`` wins. ``dynamic=False`` unless given (static shapes: a new
  input size compiles once more).

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


def check_compile_option(value, name='compile'):
    """``None`` (off) or the ``torch.compile`` kwargs a value asks for.

    Args:
        value (bool | dict | None): ``False``/``None`` off, ``True`` on with
            the defaults, a dict of ``torch.compile`` keyword arguments.
        name (str): The option's name for the error message.
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
        return dict(value)
    raise ValueError(f'{name}={value!r} must be True, False, None or a dict '
                     'of torch.compile arguments')


def _first_tensor(args):
    for arg in args:
        if torch.is_tensor(arg):
            return arg
        if isinstance(arg, (list, tuple)):
            found = _first_tensor(arg)
            if found is not None:
                return found
    return None


def compile_kwargs(options, device):
    """``torch.compile`` kwargs for ``options`` on ``device``: CUDA graphs
    (``mode='reduce-overhead'``) on CUDA unless a mode or a backend is
    given, ``dynamic=False`` unless given."""
    kwargs = dict(options)
    kwargs.setdefault('dynamic', False)
    if device is not None and torch.device(device).type == 'cuda' and \
            'mode' not in kwargs and 'backend' not in kwargs:
        kwargs['mode'] = 'reduce-overhead'
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
            tensor = _first_tensor(args)
            kwargs_ = compile_kwargs(
                self.options, None if tensor is None else tensor.device)
            fn = self._fns[key] = torch.compile(method, **kwargs_)
        return fn(*args, **kwargs)

    # a copy compiles its own owner's methods
    def __deepcopy__(self, memo):
        return CompiledMethods(self.options)

    def __getstate__(self):
        return {'options': self.options, '_fns': {}}

    def __repr__(self):
        return f'CompiledMethods(options={self.options!r})'
