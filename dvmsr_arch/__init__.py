"""DVMSR as a BasicSR plugin: importing this package registers its networks and models."""
from dvmsr_arch import compat  # noqa: F401  (must run before the first basicsr import)
from dvmsr_arch import archs, models, ops  # noqa: F401

__version__ = '0.1.0'
