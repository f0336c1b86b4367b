"""capsa's domain: plain dataclasses shared by every component; imports nothing of capsa."""
