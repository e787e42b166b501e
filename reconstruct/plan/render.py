"""Plain-text tables and sizes for the plan's rendering (`retrain --plan`, the run's log)."""
from __future__ import annotations

GIB = 2**30


def size(count: float) -> str:
    """Bytes in binary units, three significant figures: '12.6 GiB', '640 MiB', '0 B'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale * 1000 / 1024:  # 1000 MiB and more in GiB: three figures suffice
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def quantity(count: float) -> str:
    """A count in thousands, millions, billions, with SI prefixes (B is for bytes): '6.74 G', '40 M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f}"


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; columns in `right` aligned right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(cell).rjust(width) if index in right else str(cell).ljust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])
