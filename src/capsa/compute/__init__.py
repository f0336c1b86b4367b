"""The compute agent: one per host, it converges the capsules placed on it onto the runtime."""
