"""Technician diagnostics: ``atmguard diag`` (every check in one table), its camera, card and
keypad tools, and the rendering of ``atmguard status``.

One module per job: :mod:`.model` (check results and the time-bounded runner), :mod:`.system_checks`
(config, models, journal, disk, central, clock), :mod:`.hardware_checks` (the devices, opened
directly under the hardware lock), :mod:`.daemon_checks` (the daemon's health and the hardware rows
it answers while it owns the devices), :mod:`.full` (which checks run, and how the lock decides),
:mod:`.render` (table, JSON, status text), :mod:`.camera_picture`, :mod:`.card_tool` and
:mod:`.keypad_tool`. Nothing here is imported until a command runs.
"""
