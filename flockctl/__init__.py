"""flockctl: a control plane for serving large language models.

The ``flockctl`` package holds the command line and the daemon lifecycle; the daemon itself is
``flockctl.server``, the inference engine ``flockctl.engine`` and the dashboard themes
``flockctl.themes``. Importing this package is cheap: it pulls in neither torch nor textual.
"""

from __future__ import annotations

__version__ = "0.1.0"
