"""The full-screen dashboard (``flockctl dashboard``); the only part of ``flockctl`` that imports
Textual."""
