import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def get_version():
    scope = {}
    with open(osp.join(HERE, 'mmlocal', 'version.py')) as f:
        exec(compile(f.read(), 'mmlocal/version.py', 'exec'), scope)
    return scope['__version__']


def parse_requirements(name):
    """Read ``requirements/<name>.txt``, skipping comments and blank lines."""
    reqs = []
    with open(osp.join(HERE, 'requirements', f'{name}.txt')) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                reqs.append(line)
    return reqs


setup(
    name='mmlocal',
    version=get_version(),
    description='Supervised local learning, Replacement Learning and GSO-YOLO '
    'for OpenMMLab detectors and segmenters',
    long_description=open(osp.join(HERE, 'README.md')).read()
    if osp.exists(osp.join(HERE, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'docs')),
    include_package_data=True,
    python_requires='>=3.9',
    license='Apache License 2.0',
    install_requires=parse_requirements('runtime') + ['mmcv>=2.0.0rc4,<2.2.0'],
    extras_require=dict(tests=parse_requirements('tests')),
    zip_safe=False,
)
