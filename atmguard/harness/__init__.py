"""Test and demo harness: drive simulated hardware and scenarios."""
