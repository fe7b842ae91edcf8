"""Which replicas Serve's controller routes to, as the routers in this process learn it.

A separate module on purpose: Serve cloudpickles a request router's module *by value*, so a registry kept in
``actors/replica_router.py`` would be a private copy inside the router. The router reaches this module by
import, which is the one every other part of the process sees.
"""

from __future__ import annotations

from typing import Callable

Listener = Callable[[str, str, set[str]], None]
_listeners: list[Listener] = []


def watch_replicas(callback: Listener) -> None:
    """``callback(app_name, deployment_name, replica_ids)`` whenever a router in this process gets a new set."""
    _listeners.append(callback)


def publish(app_name: str, deployment_name: str, replica_ids: set[str]) -> None:
    for callback in list(_listeners):
        callback(app_name, deployment_name, replica_ids)
