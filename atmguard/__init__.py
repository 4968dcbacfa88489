"""atmguard: face-aware security daemon for Raspberry Pi based ATMs.

Importing this package has no side effects: no GPIO, camera, serial port or network is
touched until a backend is explicitly built (see ``atmguard.hardware.registry``).
"""

__version__ = "0.1.0"
