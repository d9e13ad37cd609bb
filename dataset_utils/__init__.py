"""Loading, normalizing, splitting and tokenizing text-to-SQL datasets.

The base layer of the project: `trainer`, `evaluation` and `cluster` build on it.
Nothing here imports torch or transformers at module import time.
"""
