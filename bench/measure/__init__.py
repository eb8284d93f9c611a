"""Measurements of one patched model: accuracy and the unreduced model's outputs, MACs,
throughput and latency, the per-image outcomes, and the metric groups that run them.
"""
