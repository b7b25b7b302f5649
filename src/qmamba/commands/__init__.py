"""The commands that use a trained model or the weights cache, one module each: ``qmamba score`` (and its output
formats), ``qmamba serve`` (and its page in ``web/``), ``qmamba export`` and ``qmamba weights``.

They import the inference core and the file layer, no Lightning; only :mod:`qmamba.cli` imports them."""
