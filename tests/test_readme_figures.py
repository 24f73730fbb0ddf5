"""Every figure the README quotes from a benchmark record matches that record.

A quoted figure carries its source right after it, as an HTML comment that Markdown does not
show: ``88.9<!-- cpu/demo-seeds.json rows[method=task_arithmetic,surgery=surgeryv2].mean -->``.
The record is a JSON file under ``benchmarks/results/``; the key is a path into it: dict keys
and list indices separated by dots, ``list[k=v,...]`` picks the one item whose fields match, and
a trailing ``*100`` scales a fraction to a percentage. A figure derived from the record says how:
``a÷b`` divides the values at two keys (either may be a number: ``1÷ceiling`` is a floor), and a
``-1`` before any ``*`` subtracts one, so ``a÷b-1*100`` is how much a exceeds b, in percent. The
figure is the number just before the comment; it must equal the record's value rounded to the
figure's decimals.

A figure whose record flags it (a ``"above_ceiling": true`` on the cited item or any item on
the way to it: a ratio beyond what its work allows, which the benchmark says not to cite) may
not be quoted at all.

Between ``<!-- cited -->`` and ``<!-- /cited -->`` every figure (a number with a decimal point,
or followed by %, × or x, or by a unit of time, size or rate: s, ms, min, MB, GB, images/s,
steps/s) must carry such a comment: a quoted figure without a record fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CITE = re.compile(r"<!--\s*((?:[\w.-]+/)+[\w.-]+\.json)\s+(\S+?)\s*-->")
FIGURE = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(\s*(?:%|×|x\b)|\s(?:ms|s|min|MB|GB|images/s|steps/s)\b)?"
)
REGION = re.compile(r"<!-- cited -->(.*?)<!-- /cited -->", re.S)


def lookup(record, key: str, flags: list | None = None):
    """The value at ``key`` (see the module docstring) in ``record``; every item on the way
    that carries ``above_ceiling: true`` is appended to ``flags``."""
    scale = 1.0
    if "*" in key:
        key, factor = key.rsplit("*", 1)
        scale = float(factor)
    offset = 0.0
    if key.endswith("-1"):
        key, offset = key[:-2], 1.0
    if "÷" in key:  # not "/": record keys such as "all-tasks/v1" hold a slash
        numerator, denominator = key.split("÷")
        value = lookup(record, numerator, flags) / lookup(record, denominator, flags)
        return (value - offset) * scale
    if re.fullmatch(r"\d+(?:\.\d+)?", key):
        return (float(key) - offset) * scale
    value = record
    for part in re.findall(r"[^.\[\]]+(?:\[[^\]]*\])?", key):
        name, _, select = part.partition("[")
        if name.isdigit() and isinstance(value, list):
            value = value[int(name)]
        else:
            value = value[name]
        if select:
            wanted = dict(kv.split("=", 1) for kv in select.rstrip("]").split(","))
            found = [v for v in value if all(str(v.get(k)) == w for k, w in wanted.items())]
            if len(found) != 1:
                raise KeyError(f"{part}: {len(found)} items match")
            value = found[0]
        if isinstance(value, dict) and value.get("above_ceiling") is True and flags is not None:
            flags.append(part)
    return (value - offset) * scale


def figure_before(text: str) -> str | None:
    """The figure that ends ``text`` (markup such as ``**`` or a unit between them allowed)."""
    tail = re.sub(r"[*_`\s]+$", "", text)
    tail = re.sub(r"\s*(%|×|x| ms| s| pt| points?)$", "", tail)
    match = re.search(r"((?:(?<![\w>])[-+−])?\d[\d,]*(?:\.\d+)?)$", tail)  # 92.2-93.4: a range
    return match.group(1) if match else None


def matches(figure: str, value: float) -> bool:
    """Whether ``figure`` is ``value`` rounded to the figure's decimals."""
    number = float(figure.replace(",", "").replace("−", "-"))
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return abs(number - round(float(value), decimals)) < 0.5 * 10**-decimals + 1e-9


def citations(text: str) -> list[tuple[str, str, str | None]]:
    """``(record, key, figure)`` for every citation comment of ``text``."""
    return [(m.group(1), m.group(2), figure_before(text[: m.start()])) for m in CITE.finditer(text)]


def uncited_figures(text: str) -> list[str]:
    """The figures inside the cited regions of ``text`` that no citation follows."""
    missing = []
    for region in REGION.findall(text):
        plain = CITE.sub("\0", region)  # a citation marks the figure just before it
        plain = re.sub(r"<!--.*?-->", "", plain, flags=re.S)
        plain = re.sub(r"`[^`]*`", "", plain)  # commands, paths and names are not figures
        for m in FIGURE.finditer(plain):
            figure, unit = m.group(1), m.group(2)
            if "." not in figure and not unit:
                continue  # counts, sizes, seeds: settings, not measured figures
            rest = plain[m.end() :]
            if not re.match(r"[*_\s]*(?:%|×|x| ms| s)?[*_]*\0", rest):
                missing.append(plain[max(0, m.start() - 30) : m.end() + 10].replace("\n", " "))
    return missing


README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("record, key, figure", citations(README))
def test_a_quoted_figure_equals_its_record(record, key, figure):
    path = RESULTS / record
    assert path.is_file(), f"the README cites {record}, which is not under benchmarks/results"
    assert figure is not None, f"no figure before the citation of {record} {key}"
    flags: list = []
    value = lookup(json.loads(path.read_text()), key, flags)
    assert matches(figure, value), f"README says {figure}, {record} {key} is {value}"
    assert not flags, f"README quotes {record} {key}, which its record flags above its ceiling"


def test_every_figure_in_a_cited_region_has_its_record():
    assert REGION.search(README), "the README marks no cited region"
    assert uncited_figures(README) == []


def test_the_checks_catch_a_wrong_and_an_uncited_figure():
    record = {"rows": [{"m": "a", "v": [88.94, 0.761]}, {"m": "b", "v": [1.0, 2.0]}]}
    assert lookup(record, "rows[m=a].v.0") == 88.94
    assert lookup(record, "rows[m=a].v.1*100") == pytest.approx(76.1)
    assert matches("88.9", 88.94) and not matches("89.0", 88.94) and matches("76", 76.1)
    text = (
        "<!-- cited -->| x | **88.9**<!-- cpu/r.json rows[m=a].v.0 --> | 5.26× | 3 |"
        " 449 images/s, 5 steps, 102<!-- cpu/r.json rows[m=b].v.1 --> s<!-- /cited -->"
    )
    assert citations(text) == [
        ("cpu/r.json", "rows[m=a].v.0", "88.9"),
        ("cpu/r.json", "rows[m=b].v.1", "102"),
    ]
    flags: list = []
    ratios = {"targets": [{"c": 1, "ratio": 9.5, "above_ceiling": True}, {"c": 4, "ratio": 7.0}]}
    assert lookup(ratios, "targets[c=4].ratio", flags) == 7.0 and flags == []
    assert lookup(ratios, "targets[c=1].ratio", flags) == 9.5 and flags == ["targets[c=1]"]
    missing = uncited_figures(text)  # a rate is a measured figure, a count of steps is not
    assert len(missing) == 2 and "5.26" in missing[0] and "449 images/s" in missing[1]


def test_a_derived_figure_is_computed_from_its_record():
    record = {"bytes": {"v2": 392.5, "merged": 367.6, "all/v1": 2.0}, "r": {"x": 6.61, "x2": 1.068}}
    assert lookup(record, "bytes.v2÷bytes.merged") == pytest.approx(392.5 / 367.6)
    assert lookup(record, "bytes.v2÷bytes.merged-1*100") == pytest.approx(6.774, abs=1e-3)
    assert lookup(record, "r.x2-1*100") == pytest.approx(6.8)
    assert lookup(record, "1÷r.x") == pytest.approx(0.1513, abs=1e-4)
    assert lookup(record, "bytes.all/v1") == 2.0  # a slash belongs to the key
    ratios = {"t": [{"c": 1, "ratio": 9.5, "above_ceiling": True}, {"c": 4, "ratio": 7.0}]}
    flags: list = []
    assert lookup(ratios, "t[c=4].ratio÷t[c=1].ratio", flags) == pytest.approx(7 / 9.5)
    assert flags == ["t[c=1]"]  # a flagged value may not be quoted through a ratio either
    text = (
        "<!-- cited -->adds 6.8%<!-- cpu/r.json bytes.v2÷bytes.merged-1*100 -->, floor 0.15×"
        "<!-- cpu/r.json 1÷r.x -->, 6.7%<!-- /cited -->"
    )
    assert citations(text) == [
        ("cpu/r.json", "bytes.v2÷bytes.merged-1*100", "6.8"),
        ("cpu/r.json", "1÷r.x", "0.15"),
    ]
    assert matches("6.8", lookup(record, "bytes.v2÷bytes.merged-1*100"))
    assert not matches("6.7", lookup(record, "bytes.v2÷bytes.merged-1*100"))
    assert len(uncited_figures(text)) == 1 and "6.7" in uncited_figures(text)[0]
