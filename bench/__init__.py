"""Benchmark scripts, run as ``python -m sift.bench.<name>`` (see bench/README.md).

``python -m`` puts the working directory first on ``sys.path``. From the repository root that exposes the
top-level folders (kernels/, models/, ...) under their bare names, and kernels/ would then shadow the HF
``kernels`` package that transformers imports for its reference models. Sift itself imports everything as
``sift.*``, so the root entry is dropped here, before any bench module imports transformers.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
