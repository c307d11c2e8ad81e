"""What ``train.py`` needs beyond the model: the run folder's layout, checkpoints, metrics, settings.

Nothing here is imported by ``import generalist``: a user of the model never pays for accelerate,
TensorBoard or tyro. Like the rest of the library, this package never imports ``train.py``,
``eval`` or ``datasets_build``; they import it.
"""
