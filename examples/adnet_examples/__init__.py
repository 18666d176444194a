"""What the example scripts and benchmarks share beside the model package: their command-line arguments and how
they build a model from them (`arguments`), and readers of local data with its preprocessing (`data`).

It needs the `examples` extra (`pip install -e ".[examples]"`); `adnet_hf` itself never imports it.
"""
