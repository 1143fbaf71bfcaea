"""Benchmarks that put genq's figures beside what they are compared to, measured in the same run.

One module per measurement (throughput, overhead, failover, lifecycle, scale), each writing JSON and
a Markdown table to bench/results/; `genq bench` runs them. A benchmark reports: it never fails on a
time, only when the thing it measures does not work at all.
"""
