"""Host-side native symbolization: ELF symbols + DWARF lines, debug files, kernel symbols."""

from agent.symbols.symbolizer import Symbolizer

__all__ = ["Symbolizer"]
