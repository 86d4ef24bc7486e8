"""Imports every ``*_arch.py`` here so that its networks register in BasicSR's ARCH_REGISTRY."""
import importlib
from pathlib import Path

_arch_modules = [importlib.import_module(f'{__name__}.{path.stem}')
                 for path in sorted(Path(__file__).parent.glob('*_arch.py'))]
