"""The ``atmguard`` command line: the daemon's and the technician's entry point."""
