"""A Neutron v2.0-compatible API for capsa's tenant networks, under ``/networking``."""
