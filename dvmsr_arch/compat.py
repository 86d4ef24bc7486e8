"""The few places where basicsr 1.4.2 does not fit today's PyTorch; imported before any basicsr module.

Each fix is a small patch on basicsr or torchvision as installed, never a copy of their code.
"""
import sys

import torchvision.transforms.functional as _tv_functional

# basicsr.data.degradations imports `torchvision.transforms.functional_tensor`, which torchvision
# 0.17 removed; the one function basicsr takes from it (rgb_to_grayscale) lives on in `functional`.
sys.modules.setdefault('torchvision.transforms.functional_tensor', _tv_functional)
