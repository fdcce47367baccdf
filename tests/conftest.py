"""Test-session setup.

Triton's interpreter runs the Triton FPS kernel (pointbert/kernels.py) on the CPU. Triton reads the
switch when it is first imported, so it is set here, before anything imports it, and only where no
CUDA device is present (there the kernel is compiled and checked by the ``gpu`` tests instead).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
