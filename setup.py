from pathlib import Path

from setuptools import find_packages, setup

setup(
    name='dvmsr',
    version='0.1.0',
    description='DVMSR (Distillated Vision Mamba for efficient Super-Resolution) as a BasicSR plugin',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='MIT',
    packages=find_packages(include=['dvmsr_arch', 'dvmsr_arch.*']),
    python_requires='>=3.9',
    # A minimum torch, never a pin, so the package installs beside the torch a GPU machine already has.
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'basicsr==1.4.2',
        'lmdb',
        'opencv-python',
        'pyyaml',
        'numpy',
        'tqdm',
    ],
    extras_require={
        # Compiled CUDA kernels of the released code; they neither install nor import without CUDA.
        'mamba': ['mamba-ssm>=2.2', 'causal-conv1d>=1.4'],
        'demo': ['scikit-image'],
        'plots': ['matplotlib'],
        'flops': ['fvcore'],
        'export': ['onnx'],
        'dev': ['pytest'],
    },
)
