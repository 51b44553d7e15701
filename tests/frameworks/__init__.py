"""Training runs written to disk the way real frameworks and well-known training scripts write them.

Each builder returns a :class:`tests.frameworks.common.FrameworkRun` describing what cmd
should find in the run (names, steps, weight sets) and how to load a rebuilt checkpoint
back through the framework's own loader.
"""
