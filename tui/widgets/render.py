"""Small text renderings shared by the panels."""

from __future__ import annotations

from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values, width: int = 30) -> str:
    """Values in [0, 1] as block characters, the last `width` of them."""
    vals = list(values)[-width:]
    return "".join(BLOCKS[min(len(BLOCKS) - 1, max(0, round(v * (len(BLOCKS) - 1))))] for v in vals)


def bar(fraction: float, width: int = 20, warn: float = 0.9) -> Text:
    """A gauge: full cells, then empty ones, red past `warn`."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    style = "red" if fraction >= warn else "green" if fraction < 0.7 else "yellow"
    return Text("█" * full, style=style) + Text("░" * (width - full), style="grey37")
