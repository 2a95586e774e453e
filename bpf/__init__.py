"""BPF C sources, shipped as package data so the agent finds them installed or from a checkout."""

from importlib import resources


def source(name: str) -> str:
    """Return the text of the BPF C program ``name`` (e.g. ``"cpu.bpf.c"``)."""
    return resources.files(__package__).joinpath(name).read_text()
