"""The customer session: typed events in, a pure state machine, typed actions out.

Hardware threads only put :mod:`~atmguard.session.events` on the controller's queue; the
controller feeds them to :func:`~atmguard.session.machine.step` and carries out the returned
:mod:`~atmguard.session.actions`. Nothing here does I/O except the controller.
"""
