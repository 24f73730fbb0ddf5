"""The demo's accuracy table over seeds, with its spread: ``python benchmarks/demo_seeds.py -h``.

A thin entry point: the summary is :mod:`surgery_edge.bench.seeds`.
"""

from surgery_edge.bench.seeds import main

if __name__ == "__main__":
    main()
