"""Nipype workflows wiring the ``pipeline`` stages, and the command-line entry points."""
