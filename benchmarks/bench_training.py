"""Surgery training speed: ``python benchmarks/bench_training.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.training`.
"""

from surgery_edge.bench.training import main

if __name__ == "__main__":
    main()
