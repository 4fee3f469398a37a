"""elmctl: experiment manager for Apple's OpenELM models.

The public API is loaded lazily, so ``import elmctl`` (and the CLI) does not import torch::

    import elmctl
    model = elmctl.build_model("tiny", num_layers=2)   # logits = model(ids[B, T]) -> [B, T, V]
    elmctl.save_pretrained(model, "out/hf")             # Apple's HF layout (config.json + safetensors)
    model = elmctl.load_pretrained("out/hf")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "build_model": "elmctl.model.openelm",
    "OpenELM": "elmctl.model.openelm",
    "generate": "elmctl.model.generate",
    "save_pretrained": "elmctl.model.hf",
    "load_pretrained": "elmctl.model.hf",
    "load_recipe": "elmctl.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elmctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
