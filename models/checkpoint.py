"""The weight files of a Hugging Face model directory, read one tensor at a time.

A downloaded folder is taken as it is: ``model.safetensors.index.json`` names the shards when there is
one; Mistral's own ``consolidated*.safetensors`` (different tensor names, often shipped beside the HF
shards) are ignored when HF-named files exist; ``pytorch_model*.bin`` (and its index) are the fallback,
read with ``torch.load(weights_only=True)``.

:class:`CheckpointWeights` is the mapping a model's ``load_weights`` consumes: a tensor is read from
disk, converted and moved to the device only when the model asks for it (``pop`` / ``[]``), so host
memory never holds more than one tensor of a safetensors checkpoint, or one shard of a ``.bin`` one.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Optional

import torch

from sift.models.registry import ModelLoadError

logger = logging.getLogger(__name__)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_CONSOLIDATED = "consolidated*.safetensors"  # Mistral's reference-implementation names, not HF's


@dataclass(frozen=True)
class WeightFiles:
    format: str  # "safetensors" | "bin"
    files: tuple[str, ...]  # absolute paths, sorted
    index: Optional[dict] = None  # tensor name -> file, from an index.json (None: read each file's header)


def find_weight_files(path: str) -> WeightFiles:
    """Which files of the directory ``path`` hold the model's weights (ModelLoadError when none do)."""
    names = sorted(os.listdir(path))
    if _SAFETENSORS_INDEX in names:
        return _from_index(path, "safetensors", _SAFETENSORS_INDEX)
    safetensors = [n for n in names if n.endswith(".safetensors")]
    hf_named = [n for n in safetensors if not fnmatch.fnmatch(n, _CONSOLIDATED)]
    if hf_named:
        if len(hf_named) < len(safetensors):
            logger.info("ignoring %s: Mistral-format duplicates of the HF-named weights",
                        ", ".join(sorted(set(safetensors) - set(hf_named))))
        return WeightFiles("safetensors", tuple(os.path.join(path, n) for n in hf_named))
    if _BIN_INDEX in names:
        return _from_index(path, "bin", _BIN_INDEX)
    bins = [n for n in names if fnmatch.fnmatch(n, "pytorch_model*.bin")]
    if bins:
        return WeightFiles("bin", tuple(os.path.join(path, n) for n in bins))
    if safetensors:
        raise ModelLoadError(f"{path} holds only {', '.join(safetensors)} (Mistral's own format); "
                             "Sift reads the Hugging Face layout (model*.safetensors)")
    raise ModelLoadError(f"{path} has no *.safetensors or pytorch_model*.bin weights")


def _from_index(path: str, fmt: str, index_name: str) -> WeightFiles:
    try:
        with open(os.path.join(path, index_name)) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}/{index_name} is not a valid index ({type(e).__name__}: {e})") from None
    index = {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = tuple(sorted(set(index.values())))
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise ModelLoadError(f"{path}/{index_name} names {len(missing)} missing shard(s), e.g. {missing[0]}")
    return WeightFiles(fmt, files, index)


class CheckpointWeights(MutableMapping):
    """Checkpoint tensor name -> tensor in ``dtype`` on ``device``, read from disk on access.

    Deleting a name (``pop``) forgets it; the names still present after ``load_weights`` are the
    checkpoint's unexpected tensors.
    """

    def __init__(self, files: WeightFiles, dtype: torch.dtype, device, transform=None):
        """``transform(name, tensor)``: applied to each tensor once converted (e.g. quantizing it at load)."""
        self.files, self.dtype, self.device = files, dtype, torch.device(device)
        self.transform = transform
        self._handles: dict = {}  # safetensors file -> open safe_open handle (an mmap, no tensor data)
        self._ready: dict = {}  # .bin: converted tensors of shards already read, until taken
        self._done_shards: set = set()
        if files.index is not None:
            self._where = dict(files.index)
        elif files.format == "safetensors":
            self._where = {}
            for file in files.files:
                for name in self._handle(file).keys():
                    if name in self._where:
                        raise ModelLoadError(f"tensor {name!r} is in both {os.path.basename(self._where[name])} "
                                             f"and {os.path.basename(file)}")
                    self._where[name] = file
        else:  # .bin without an index: the names are only known by reading the shards
            self._where = {}
            for file in files.files:
                for name, t in self._read_bin(file).items():
                    self._ready[name], self._where[name] = t, file
                self._done_shards.add(file)

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise ModelLoadError(f"cannot read {os.path.basename(file)}: {e}") from None
        return self._handles[file]

    def _convert(self, name: str, t: torch.Tensor):
        t = t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
        return t if self.transform is None else self.transform(name, t)

    def _read_bin(self, file: str) -> dict:
        """A whole .bin shard, each tensor converted; the host copy of the shard is dropped on return."""
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only refusals all mean: not a plain state dict
            raise ModelLoadError(f"cannot read {os.path.basename(file)}: {str(e).splitlines()[0]}") from None
        if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
            raise ModelLoadError(f"{os.path.basename(file)} is not a state dict of tensors")
        return {name: self._convert(name, shard.pop(name)) for name in list(shard)}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._where[name]  # KeyError for a name the checkpoint lacks
        if self.files.format == "safetensors":
            handle = self._handle(file)
            try:
                return self._convert(name, handle.get_tensor(name))
            except Exception as e:  # an index naming a tensor its shard lacks
                raise ModelLoadError(f"cannot read tensor {name!r} from {os.path.basename(file)}: {e}") from None
        if file not in self._done_shards:
            shard = self._read_bin(file)
            self._ready.update((n, t) for n, t in shard.items() if n in self._where)
            self._done_shards.add(file)
        if name not in self._ready:
            raise ModelLoadError(f"tensor {name!r} is missing from {os.path.basename(file)}")
        return self._ready[name]

    def __delitem__(self, name: str) -> None:
        del self._where[name]
        self._ready.pop(name, None)

    def pop(self, name: str, *default):
        if name not in self._where and default:
            return default[0]
        value = self[name]
        del self[name]
        return value

    def __setitem__(self, name: str, value) -> None:
        raise TypeError("checkpoint weights are read-only")

    def __iter__(self):
        return iter(list(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where
