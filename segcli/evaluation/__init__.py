"""Measuring a model on a dataset: the evaluation loop, the confusion-matrix metrics, the papers' benchmark table."""
