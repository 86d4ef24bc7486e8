"""Imports every ``*_model.py`` here so that its models register in BasicSR's MODEL_REGISTRY."""
import importlib
from pathlib import Path

_model_modules = [importlib.import_module(f'{__name__}.{path.stem}')
                  for path in sorted(Path(__file__).parent.glob('*_model.py'))]
