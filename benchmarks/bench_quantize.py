"""Quantisation recipes on a run's engines: ``python benchmarks/bench_quantize.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.quantize`.
"""

from surgery_edge.bench.quantize import main

if __name__ == "__main__":
    main()
