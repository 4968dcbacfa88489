"""Camera role: a lores stream for inference and a main stream for evidence.

Backends (picamera2, replay, sim) live in their own modules and are imported only when the
registry builds them; this package imports no camera stack.
"""

from __future__ import annotations

from atmguard.errors import CameraError, CameraTimeout
from atmguard.hardware.camera.base import Camera, Frame

__all__ = ["Camera", "CameraError", "CameraTimeout", "Frame"]
