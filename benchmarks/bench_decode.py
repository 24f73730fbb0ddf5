"""Decoding a dataset into the run's image cache: ``python benchmarks/bench_decode.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.decode`.
"""

from surgery_edge.bench.decode import main

if __name__ == "__main__":
    main()
