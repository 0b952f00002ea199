"""Measuring sgex: `sgex-bench` (bench/cli.py), the GPU proof (bench/gpu/) and committed results
(bench/results/<device>/). Not part of a deployed app; imports without torch."""
