"""Tests and helpers that run the pipeline's processes for real: the metrics chain (StatsD stand-in,
Prometheus, alert rules, dashboard queries) and the CeleryExecutor cluster."""
