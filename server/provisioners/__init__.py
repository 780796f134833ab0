"""Provisioners: what creates and removes the resource behind each worker."""

from __future__ import annotations

from flockctl.server.provisioners.base import Capabilities, Provisioner, ResourceHealth
from flockctl.server.provisioners.local import LocalProvisioner
from flockctl.server.provisioners.static import StaticProvisioner

__all__ = [
    "Capabilities",
    "LocalProvisioner",
    "Provisioner",
    "ResourceHealth",
    "StaticProvisioner",
]
