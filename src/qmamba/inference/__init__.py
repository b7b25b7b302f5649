"""Using a trained model: a checkpoint to a model (``trained``), the image reader, preprocessing and score scales, the
:class:`~qmamba.inference.scoring.Scorer` behind ``qmamba.load``, quality maps and ONNX export.

Imports ``files``, ``ops`` and ``models``, never ``data``, ``training`` or Lightning, albumentations or pandas (a test
checks), so that scoring stays light."""
