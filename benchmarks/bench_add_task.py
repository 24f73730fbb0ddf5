"""A task added after the merge (frozen, remerge) against the eight-task pipeline:
``python benchmarks/bench_add_task.py -h``.

A thin entry point: the measurement is :mod:`surgery_edge.bench.add_task`.
"""

from surgery_edge.bench.add_task import main

if __name__ == "__main__":
    main()
