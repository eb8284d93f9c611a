"""Runners map ``evaluate(spec) -> records`` over a sweep: in-process or on Ray Tune."""
