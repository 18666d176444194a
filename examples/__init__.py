"""The example scripts: each runs as `python examples/<script>.py`; tests import them as modules."""
