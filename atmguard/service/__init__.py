"""Service plumbing for `atmguard run`: systemd notification, logging set-up, the host decision socket."""
