"""Speculative decoding's drafts: where guesses come from (``ngram``: the session's own
n-grams; ``model``: a small local model) and how many to make (``length``). Verification
happens on the last node (``node/sampling.verify``)."""
