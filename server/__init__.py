"""flockctl's control daemon: balancer, worker registry, prober, autoscaler, provisioners.

Must not import textual, torch, transformers or ``flockctl.engine``: it runs on machines without
them, and talks to workers over HTTP only.
"""

from __future__ import annotations
