"""Surgery's schedule, learning rate, steps and V1 rank, tuned on the adaptation split:
``python benchmarks/sweep_surgery.py --help``.

A thin entry point: the sweep is :mod:`surgery_edge.bench.sweep`.
"""

from surgery_edge.bench.sweep import main

if __name__ == "__main__":
    main()
