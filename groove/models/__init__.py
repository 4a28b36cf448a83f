"""Checkpoints without weights: resolving, headers, fingerprints, sizes and splits."""
