"""Importing atmguard, and `atmguard --help`, must touch no GPIO, camera, serial port or network.

Checked with a CPython audit hook in a fresh interpreter: it sees every file open and socket
operation, so the assertion is about what the code *did*, not about which modules it names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import json, sys
    touched = []
    def hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(("/dev/", "/sys/class/gpio", "/proc/device-tree")):
            touched.append(f"open {args[0]}")
        elif event.startswith("socket.") and event not in ("socket.getaddrinfo", "socket.gethostname"):
            touched.append(event)
        elif event == "subprocess.Popen":
            touched.append(f"exec {args[0]}")
    sys.addaudithook(hook)
    {body}
    hardware_modules = sorted(m for m in sys.modules if m.split(".")[0] in ("picamera2", "libcamera", "lgpio", "RPi", "pigpio"))
    print(json.dumps({"touched": touched, "hardware_modules": hardware_modules, "modules": sorted(sys.modules)}))
    """
)


def _probe(body: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.replace("{body}", body)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_every_module_touches_no_hardware():
    result = _probe(
        "import pkgutil, importlib, atmguard\n"
        "for m in pkgutil.walk_packages(atmguard.__path__, 'atmguard.'):\n"
        "    if m.name != 'atmguard.__main__':\n"
        "        importlib.import_module(m.name)\n"
    )
    assert result["touched"] == []
    assert result["hardware_modules"] == []
    assert "atmguard.hardware.display" in result["modules"]  # the walk really imported the package


def test_help_touches_no_hardware_and_imports_no_backend():
    result = _probe(
        "import contextlib, io\n"
        "from atmguard.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    assert result["touched"] == []
    heavy = {"gpiozero", "serial", "numpy", "pymysql", "PIL", "ai_edge_litert", "tflite_runtime"}
    assert heavy.isdisjoint(m.split(".")[0] for m in result["modules"])
