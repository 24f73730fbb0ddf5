"""How many unlabelled adaptation images surgery needs: ``python benchmarks/adapt_size.py -h``.

A thin entry point: the measurement is :mod:`surgery_edge.bench.adapt_size`.
"""

from surgery_edge.bench.adapt_size import main

if __name__ == "__main__":
    main()
