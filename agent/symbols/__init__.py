"""Host-side symbolization: /proc maps, ELF symbols + DWARF lines, kernel symbols."""

from agent.symbols.symbolizer import Symbolizer

__all__ = ["Symbolizer"]
