"""Hardware roles: each an interface with a real backend and a simulator.

Nothing here imports a backend; use :func:`atmguard.hardware.registry.build` to construct the
one a config names, so that a laptop never imports picamera2 or lgpio.
"""
