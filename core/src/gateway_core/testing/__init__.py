"""Public test helpers for plugin authors: fixtures, an in-process driver, a fake scheduler.

`gateway_core.testing.plugin` is the pytest plugin (entry point `pytest11`) holding the fixtures.
"""
