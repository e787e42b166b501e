"""Corrections behind one interface: `make_correction("masklora+norm").attach(unit, pruned, ...)`.

Adding a correction: a new file here with a `Correction` subclass (its `name` is the command line's
`--correction`), and its class in the list below; the list is written out rather than filled by a
decorator in each file, so that the correction files import only `base` and nothing imports back up.
Combinations are names joined by "+", e.g. "masklora+norm" (PERP's reconstruction) or "bias+norm".
"""
from .base import Attachment, Correction, CorrectionError, CorrectionOptions, ParameterAccess, combine
from .full import MaskedFull
from .loraprune import LoRAPrune
from .masklora import MaskLoRA
from .scalelora import ScaleLoRA
from .subsets import BiasOnly, NormOnly

CORRECTIONS: dict[str, type[Correction]] = {
    cls.name: cls for cls in (MaskedFull, LoRAPrune, MaskLoRA, ScaleLoRA, BiasOnly, NormOnly)}

NAMED_COMBINATIONS = ("masklora+norm", "bias+norm")


class Combined(Correction):
    """Several corrections attached to the same unit and fitted together."""

    def __init__(self, parts: list[Correction]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def attach(self, unit, pruned, options, generator):
        pruned = list(pruned)
        return combine([part.attach(unit, pruned, options, generator) for part in self.parts])


def choices() -> list[str]:
    return ["none", *CORRECTIONS, *NAMED_COMBINATIONS]


def make_correction(name: str) -> Correction | None:
    """A correction by name ("none" gives None); unknown names raise with the list of known ones."""
    if name in (None, "", "none"):
        return None
    parts = name.split("+")
    unknown = [p for p in parts if p not in CORRECTIONS]
    if unknown:
        raise CorrectionError(f"unknown correction {name!r}; choose from {', '.join(choices())} "
                              "(or join several with '+')")
    if len(parts) == 1:
        return CORRECTIONS[name]()
    return Combined([CORRECTIONS[p]() for p in parts])


__all__ = ["Attachment", "CORRECTIONS", "Correction", "CorrectionError", "CorrectionOptions",
           "ParameterAccess", "choices", "make_correction"]
