"""Sweeps: settings from files and flags, budgets resolved into each method's knob, and the grid
of run specs (``make_spec``, the one RunSpec factory).
"""
