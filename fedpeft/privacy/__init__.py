"""Differential privacy: clipping and Gaussian noise on whole updates (:mod:`.mechanisms`),
record-level DP-SGD with Opacus (:mod:`.dpsgd`) and Opacus accountants (:mod:`.accounting`)."""
