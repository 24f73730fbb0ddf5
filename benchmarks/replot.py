"""A benchmark record's plots drawn again from its JSON: ``python benchmarks/replot.py --help``.

A thin entry point: the plots are :mod:`surgery_edge.bench.plots`.
"""

from surgery_edge.bench.plots import main

if __name__ == "__main__":
    main()
