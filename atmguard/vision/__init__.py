"""Vision: the TFLite runtime shim, model manifest and the face detector.

Importing this package imports nothing heavy (no numpy, no runtime): import the submodule you
need, e.g. ``from atmguard.vision.detector import FaceDetector``.
"""
