"""Protocols that run many fits: fit-then-test (``runs``), the N-split benchmark and transfer between datasets.

They drive the Lightning CLI of :mod:`qmamba.training`; nothing below imports them."""
