"""Serving under load through Triton Inference Server: ``python benchmarks/bench_serve.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.serve`.
"""

from surgery_edge.bench.serve import main

if __name__ == "__main__":
    main()
