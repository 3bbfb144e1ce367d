"""ksleepd: the supervisor."""
