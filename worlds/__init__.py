"""Fixtures, not the library: procedural worlds (images, captions) and the small CLIPs trained on them.

The demo and the tests use this package; `xbtcore` never imports it.
"""
