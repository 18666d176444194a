"""Metrics shipped with adnet_hf as local `evaluate` modules, so they load offline: `evaluate.load(path_of_file)`.

Each file is a self-contained `evaluate.Metric` (evaluate copies the file alone into its module cache, so it may import
libraries only, one import a line); `adnet_hf.evaluation_adnet` loads them.
"""
