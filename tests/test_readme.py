"""Every table of figures in the README names the results file it comes from.

A table "of figures" is one with a number in a body cell (code spans aside; "SD 1.x" and "32x32"
are not numbers). Its section is the nearest heading above it and the text between that heading
and the table; that text must name a file that exists: one under bench/results/ or the committed
build record of the embedded model.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BUILD_RECORDS = ("erase/assets/digits-sd/digits_training.json", "erase/assets/digits-flow/digits_training.json")

NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w]|\.\w)")
CODE_SPAN = re.compile(r"`[^`]*`")
RESULTS_FILE = re.compile(r"bench/results/[\w\-]+(?:\.\w+)*\.(?:json|md)\b")
RESULTS_PAIR = re.compile(r"bench/results/([\w\-]+(?:\.\w+)*)\.\{json,md\}")


def tables(text: str) -> list[dict]:
    """Each Markdown table outside code fences: its line number, body cells and the section text above it."""
    found, heading, section, fenced, lines = [], "", [], False, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("|"):
            if not fenced and line.startswith("#"):
                heading, section = line, []
            else:
                section.append(line)
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        rows = lines[start:i]
        if len(rows) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].strip()):
            cells = [c.strip() for row in rows[2:] for c in row.strip().strip("|").split("|")]
            found.append({"line": start + 1, "cells": cells, "section": "\n".join([heading, *section])})
        section.append("\n".join(rows))
    return found


def has_figures(cells: list[str]) -> bool:
    return any(NUMBER.search(CODE_SPAN.sub("", cell)) for cell in cells)


def named_files(section: str) -> list[str]:
    names = RESULTS_FILE.findall(section) + [r for r in BUILD_RECORDS if r in section]
    for stem in RESULTS_PAIR.findall(section):
        names += [f"bench/results/{stem}.json", f"bench/results/{stem}.md"]
    return names


def test_rule_on_examples():
    assert has_figures(["seven", "0.0 ± 0.0"]) and has_figures(["4/5"]) and has_figures(["859,520,964"])
    assert not has_figures(["`erase/sd.py`", "one structure for SD 1.x, 2.x and SDXL", "SD-1.x", "32x32"])
    sample = "## A\n\ntext `bench/results/a.md`\n\n| x | y |\n|---|---|\n| a | 1 |\n\n## B\n\n| p | q |\n|---|---|\n| `f1.py` | what |\n"
    found = tables(sample)
    assert [t["line"] for t in found] == [5, 11]
    assert named_files(found[0]["section"]) == ["bench/results/a.md"] and has_figures(found[0]["cells"])
    assert not has_figures(found[1]["cells"])
    assert named_files("see `bench/results/sd_gpu.{json,md}`") == ["bench/results/sd_gpu.json", "bench/results/sd_gpu.md"]


def test_every_table_of_figures_names_its_results_file():
    found = tables(README.read_text())
    assert any(has_figures(t["cells"]) for t in found), "no table of figures found: the parser is broken"
    missing = []
    for table in found:
        if not has_figures(table["cells"]):
            continue
        existing = [name for name in named_files(table["section"]) if (ROOT / name).is_file()]
        if not existing:
            heading = table["section"].splitlines()[0] if table["section"] else "(no heading)"
            missing.append(f"README.md:{table['line']} under {heading!r}")
    assert not missing, "tables of figures whose section names no existing results file:\n" + "\n".join(missing)


FIGURE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def file_values(names: list[str]) -> set[float]:
    """Every number written in the named results files (and in the JSON beside a named .md)."""
    values = set()
    for name in names:
        paths = [ROOT / name] + ([ROOT / name.replace(".md", ".json")] if name.endswith(".md") else [])
        for path in paths:
            if path.is_file():
                values |= {float(m.replace(",", "")) for m in FIGURE.findall(path.read_text())}
    return values


def shown(figure: str, values: set[float]) -> bool:
    """`figure` as a table shows it (its decimals) is one of `values`: as it is, as a percentage of a
    fraction, or a KiB figure in MiB."""
    x, decimals = float(figure.replace(",", "")), len(figure.split(".")[1]) if "." in figure else 0
    return any(abs(v * scale - x) <= 0.5 * 10**-decimals + 1e-9 for v in values for scale in (1, 100, 1 / 1024))


def test_every_figure_in_a_table_is_in_its_results_file():
    """Changing a number in a README table fails: each one is in the results file(s) its section names."""
    assert not shown("12.5", {0.126}) and shown("12.6", {0.126}) and shown("1.36", {1394.0}) and shown("1,000", {1000.0})
    wrong = {}
    for table in tables(README.read_text()):
        if not has_figures(table["cells"]):
            continue
        values = file_values([n for n in named_files(table["section"]) if (ROOT / n).is_file()])
        cells = [CODE_SPAN.sub("", cell).replace("/ 255", "") for cell in table["cells"]]  # 8-bit pixel scale, not a figure
        missing = sorted({n for cell in cells for n in FIGURE.findall(cell) if NUMBER.search(n) and not shown(n, values)})
        if missing:
            wrong[f"README.md line {table['line']}"] = missing
    assert not wrong, wrong


def test_the_option_tables_are_rendered_from_the_parsers_declarations():
    """docs/options.md is what docs/render_options.py writes now (run it after changing an option)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_options", ROOT / "docs" / "render_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "options.md").read_text() == module.render(), "docs/options.md is stale: run python docs/render_options.py"


def test_every_package_exports_what_it_names():
    """Each name in erase's and eval's __all__ lists exists (eval named two it never imported)."""
    import importlib
    import pkgutil

    import erase
    import eval as evaluation

    for package in (erase, evaluation):
        for module in [package, *(importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__))]:
            missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
            assert not missing, (module.__name__, missing)
