"""The scripting commands, one module per command: ``up``, ``status``, ``logs``, ``down``.

``flockctl.cli`` assembles them (and the dashboard launcher, ``flockctl.tui.launch``) into the
``flockctl`` app. None of them imports textual or torch, so they start fast; what a command needs
beyond that (the config model, SkyPilot, rich's live display) is imported inside it.
"""
