"""capsa's Zun-compatible REST API (v1, microversions 1.1 to 1.40), on aiohttp.

``create_app(cfg, store)`` builds the application; one module per resource (versions, capsules,
containers, hosts), views shape responses for Zun's clients, schemas validate request bodies.
"""
