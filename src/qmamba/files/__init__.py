"""File safety: atomic writes, reading checkpoints safely, run folders and their locks, the pretrained-weights cache.

Everything that writes or trusts a file goes through here. Imports only :mod:`qmamba.errors` (and torch, lazily, to
read a checkpoint)."""
