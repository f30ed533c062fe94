"""How the benchmarks print their figures: one aligned table, one word per target."""

from __future__ import annotations

from collections.abc import Sequence


def verdict(met: bool) -> str:
    return "met" if met else "not met"


def print_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table: the first column left-aligned, the next three (figures) right-aligned."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    right_aligned = {1, 2, 3}

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded).rstrip()

    print(line(header))
    print("  ".join("-" * width for width in widths).rstrip())
    for row in rows:
        print(line(row))
