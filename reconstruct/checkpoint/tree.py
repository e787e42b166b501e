"""Nested Python values holding tensors, saved without pickle: the tensors in a safetensors file, the
structure in JSON. Reading either back can never run code, unlike `torch.load(weights_only=False)`.

What a value may hold: tensors, None, bool, int, float, str, and lists, tuples and dicts (with str
keys) of these. Anything else is refused when saving (`UnsavableValueError`, naming where it is).

The JSON form: a tensor is {"tensor": KEY} (its key in the safetensors file), a list {"list": [...]},
a tuple {"tuple": [...]}, a dict {"dict": {...}}; scalars are themselves. A tensor reached twice (the
same object, as the rotary embeddings every block is called with) is saved once and read back as one.
"""
from __future__ import annotations

import json
from typing import Any

import torch

SCALARS = (type(None), bool, int, float, str)


class UnsavableValueError(TypeError):
    """A value of a type that cannot be saved without pickle; the message names where it is."""


class DamagedTreeError(ValueError):
    """The saved structure does not read back (a truncated or edited file)."""


def encode(value: Any, root: str = "value") -> tuple[Any, dict[str, torch.Tensor]]:
    """(the JSON-able structure, the tensors it refers to by key); `root` names the value in errors."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[int, str] = {}

    def walk(item: Any, where: str) -> Any:
        if isinstance(item, torch.Tensor):
            if id(item) not in keys:
                keys[id(item)] = f"t{len(keys)}"
                # Own contiguous CPU copies: safetensors refuses views sharing memory
                tensors[keys[id(item)]] = item.detach().to("cpu").contiguous().clone()
            return {"tensor": keys[id(item)]}
        if isinstance(item, SCALARS):
            return item
        if isinstance(item, (list, tuple)):
            return {type(item).__name__: [walk(v, f"{where}[{i}]") for i, v in enumerate(item)]}
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise UnsavableValueError(f"{where} has a key {key!r} of type {type(key).__name__}")
            return {"dict": {k: walk(v, f"{where}[{k!r}]") for k, v in item.items()}}
        raise UnsavableValueError(f"{where} is a {type(item).__module__}.{type(item).__qualname__}")

    return walk(value, root), tensors


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value `encode` was given, from its structure and tensors."""
    if isinstance(structure, SCALARS):
        return structure
    if not (isinstance(structure, dict) and len(structure) == 1):
        raise DamagedTreeError(f"unexpected {type(structure).__name__} in the saved structure")
    (kind, body), = structure.items()
    if kind == "tensor" and body in tensors:
        return tensors[body]
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [decode(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(body, dict):
        return {k: decode(v, tensors) for k, v in body.items()}
    raise DamagedTreeError(f"unexpected entry {kind!r} in the saved structure")


def to_json(structure: Any) -> str:
    return json.dumps(structure, separators=(",", ":")) + "\n"
