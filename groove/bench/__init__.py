"""``groove bench``: the pipeline measured side by side with single-process transformers."""
