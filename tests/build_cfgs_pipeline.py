"""Minimal build arguments of the pipeline-parallel registered names.

``LocalPipelineParallel`` needs an initialised process group to be built,
so ``tests/test_registry.py`` builds it in a fresh process of its own
(``NEEDS_PROCESS_GROUP``) instead of from ``BUILD_CFGS``.
"""
BUILD_CFGS = {
    ('HOOKS', 'LocalPipelineHook'): lambda: dict(),
}

NEEDS_PROCESS_GROUP = {('MODEL_WRAPPERS', 'LocalPipelineParallel')}
