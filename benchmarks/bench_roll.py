"""A version roll under load (``serve REPO --watch``): ``python benchmarks/bench_roll.py --help``.

A thin entry point: the benchmark is :mod:`surgery_edge.bench.roll`.
"""

from surgery_edge.bench.roll import main

if __name__ == "__main__":
    main()
