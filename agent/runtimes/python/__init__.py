"""CPython frames in profiles: finding interpreters, reading their frames, splicing them in."""

from agent.runtimes.python.frames import PythonProcesses, PythonStacks

__all__ = ["PythonProcesses", "PythonStacks"]
