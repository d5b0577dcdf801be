"""The trainer: C-NMC data sets (real and synthetic), architectures, training, evaluation, publishing.

Nothing here imports TensorFlow at import time; the modules that need it import it inside their functions.
"""
