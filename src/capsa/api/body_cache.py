"""Encoded capsule bodies kept between list pages, as long as their capsule's version holds.

A page of 1,000 capsules costs far more to load and format (rows to objects, objects to dicts,
dicts to JSON) than to read each capsule's version (:meth:`CapsuleStore.list_page_versions`), and a
client that polls a list (Virtual Kubelet lists every capsule of its node) mostly sees capsules that
have not changed. So a list reads the versions, encodes only the capsules it has no body of for that
version, and joins the encoded bodies. A show (a client polling one capsule or container until it
runs) reads the one capsule's version alike (:meth:`CapsuleStore.find_state`). A body is kept per
capsule and *shape* (what the caller's microversion, base URL and policy make of a capsule, and
whether it is shown as a capsule or as Zun's container), the least recently used going first beyond
``max_bodies``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class BodyCache:
    def __init__(self, max_bodies: int) -> None:
        self._max = max_bodies
        self._bodies: OrderedDict[tuple[Hashable, str], tuple[str, bytes]] = OrderedDict()

    def get(self, shape: Hashable, uuid: str, version: str) -> bytes | None:
        key = (shape, uuid)
        found = self._bodies.get(key)
        if found is None or found[0] != version:
            return None
        self._bodies.move_to_end(key)
        return found[1]

    def put(self, shape: Hashable, uuid: str, version: str, body: bytes) -> None:
        key = (shape, uuid)
        self._bodies[key] = (version, body)
        self._bodies.move_to_end(key)
        while len(self._bodies) > self._max:
            self._bodies.popitem(last=False)

    def __len__(self) -> int:
        return len(self._bodies)
