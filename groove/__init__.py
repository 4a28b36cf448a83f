"""Groove: one causal LM served by a pipeline of machines, each holding a slice of its layers."""

__version__ = "0.1.0"
