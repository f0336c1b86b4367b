"""Placement of capsules on hosts: filters and weights, and the claiming loop."""
