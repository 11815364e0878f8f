"""Warden's plugins, one concern per module.

This package's only shared piece is the table below, mirrored in the
``warden.plugins`` entry point group of ``pyproject.toml``: it is the single
place where plugin names map to classes.  The core never imports from here.
"""
