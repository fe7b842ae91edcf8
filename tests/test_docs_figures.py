"""Every figure the docs quote must be traceable to a committed file that holds it.

The convention, for every `docs/*.md`:

- A **source** is a repository path in backticks: a results file or folder under `benchmarks/results/` or
  `loadtests/results/` (a `*` may name several files), or, for a figure that a test sets or asserts rather than
  a benchmark measures, the test file under `tests/` (a `::test_name` suffix is allowed). A cited path that does
  not exist fails.
- A **block** is a paragraph or a list item (its wrapped lines together), or one row of a table. A table row
  also uses the sources of the block that introduces the table (the nearest block above it), so a table's
  lead-in names its files once.
- A **figure** is a number in the prose with a decimal point (`0.914`), a thousands separator (`18,959`) or at
  least three digits (`322`), including its ratio and percent forms (`×1.45`, `1.58×`, `x1.45`, `68 %`). These
  are not figures: anything in code spans, code blocks and link targets; parts of names (`W1`, `H100`, `fp16`,
  `GPT-2`, commit hashes such as `2d6d7c1`); dates; version numbers (`vLLM 0.26`, `Ray Serve 2.60`, `a.b.c`) and
  HTTP status codes; estimates written `~N` or `≈ N`; and bounds
  written `≥ N`, `≤ N`, `< N` or `> N` (targets and test thresholds, not results).
- A block that cites a source has each of its figures looked up in its sources. A figure is found when a number
  in a source (a JSON value, or a number written in a text, markdown, CSV or log file, thousands separators
  removed) rounds to it at the figure's own number of decimals (half up, so 11,288.5 may be quoted as 11,289);
  a percentage may also be a fraction in the file (0.47 for `47 %`). A ratio or a percentage may instead be
  derived: it is found when it equals, rounded the same way, `a / b` (a percentage also `100 · a / b` or
  `100 · (1 − a / b)`) for two figures quoted in the same block or its table's lead-in. Derivations from
  arbitrary pairs of file numbers are not accepted: a big results file would then vouch for almost any ratio.
- A block with a figure in a section whose heading contains "measured" (sub-sections included) must cite a source.

So a figure that is wrong, stale or typed with a slip fails here, and a figure with no committed file behind it
must be removed or rephrased without a number.
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))

SOURCE = re.compile(r"(?<![\w./-])((?:benchmarks/results|loadtests/results|tests)/[^`\s:;,)]*[^`\s:;,).]"
                    r"|benchmarks/\w+\.py)")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b(?:January|February|March|April|May|June|July|August|September|"
                  r"October|November|December) \d{4}\b")
VERSION = re.compile(r"\b\d+\.\d+\.\d+\b|(?i:\b(?:vLLM|Ray(?: Serve)?|Serve|transformers|torch|Python|Triton|CUDA) "
                     r"v?\d+(?:\.\d+)*|\b(?:Chromium|Chrome|Firefox|Debian|Ubuntu) \(?\d+(?:\.\d+)*)|\bHTTP \d{3}\b")
BOUND = re.compile(r"[≥≤<>]=?\s*[~≈]?\s*[x×]?\d[\d,]*(?:\.\d+)?")
FIGURE = re.compile(r"(?<![\w.,/-])(?P<pre>[x×])?(?P<num>\d{1,3}(?:,\d{3})+|\d+)(?P<dec>\.\d+)?(?![\w]|[.,]\d)"
                    r"(?P<post>×|\s?%)?")
SOURCE_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")


@dataclass
class Figure:
    text: str
    value: float
    decimals: int
    kind: str  # "plain", "ratio" or "percent"
    millions: bool = False  # written "27.7 M": the file may hold 27,705,344


@dataclass
class Block:
    doc: str
    line: int  # 1-based, the block's first line
    text: str
    measured: bool
    section: int  # blocks under the same heading share it
    table_row: bool = False
    lead_in: Block | None = None
    sources: list[str] = field(default_factory=list)

    def all_sources(self) -> list[str]:
        return self.sources + (self.lead_in.sources if self.lead_in else [])


def figures(text: str) -> list[Figure]:
    for pattern in (CODE_SPAN, LINK_TARGET, DATE, VERSION, BOUND):
        text = pattern.sub(" ", text)
    found = []
    for m in FIGURE.finditer(text):
        num, dec = m["num"], m["dec"] or ""
        post = (m["post"] or "").strip()
        kind = "ratio" if m["pre"] or post == "×" else "percent" if post == "%" else "plain"
        if kind == "plain" and not dec and "," not in num and len(num) < 3:
            continue
        if re.search(r"[~≈]\s*$", text[:m.start()]):
            continue  # an estimate, not a quoted result
        millions = bool(re.match(r"\s?M\b", text[m.end():]))
        found.append(Figure(m[0].strip(), float(num.replace(",", "") + dec), max(len(dec) - 1, 0), kind, millions))
    return found


def parse_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []
    sections: list[int] = []
    current: Block | None = None
    lead_in: Block | None = None  # the block above the table being read
    in_fence = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence, current = not in_fence, None
            continue
        if in_fence:
            continue
        if not stripped:
            current = None
            continue
        if heading := re.match(r"(#+)\s+(.*)", stripped):
            level = len(heading[1])
            headings = [h for h in headings if h[0] < level] + [(level, heading[2])]
            sections.append(number)
            current = lead_in = None
            continue
        measured = any("measured" in h[1].lower() for h in headings)
        if stripped.startswith("|"):
            if current is not None and not current.table_row:
                lead_in = current
            current = Block(path.name, number, stripped, measured, len(sections), table_row=True, lead_in=lead_in)
            blocks.append(current)
            continue
        if current is None or current.table_row or LIST_ITEM.match(line):
            current = Block(path.name, number, stripped, measured, len(sections))
            blocks.append(current)
            lead_in = current
        else:
            current.text += " " + stripped
    for block in blocks:
        block.sources = [s for span in CODE_SPAN.findall(block.text) for s in SOURCE.findall(span)]
    return blocks


def resolve(source: str) -> list[Path]:
    """The files a cited path names: itself, every file under a folder, or a glob's matches."""
    matches = [Path(p) for p in sorted(glob.glob(str(ROOT / source)))]
    files = []
    for match in matches:
        files += sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match]
    return files


def _json_numbers(value, out: list[float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out.append(float(value))
    elif isinstance(value, str):
        out += _text_numbers(value)
    elif isinstance(value, dict):
        for v in value.values():
            _json_numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_numbers(v, out)


def _text_numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in SOURCE_NUMBER.findall(text.replace("_", ""))]


@lru_cache(maxsize=None)
def source_numbers(path: Path) -> tuple[float, ...]:
    if path.suffix in {".png", ".jpg", ".svg"}:
        return ()
    text = path.read_text(errors="replace")
    numbers: list[float] = []
    if path.suffix == ".json":
        _json_numbers(json.loads(text), numbers)
    else:
        numbers = _text_numbers(text)
    return tuple(n for n in numbers if math.isfinite(n))


def rounds_to(value: float, figure: Figure) -> bool:
    return abs(value - figure.value) <= 0.5 * 10 ** -figure.decimals + 1e-9 * max(1.0, abs(figure.value))


def found_in_sources(figure: Figure, numbers: list[float]) -> bool:
    scales = (1.0, 1e3, 1e-3) + ((100.0,) if figure.kind == "percent" else ()) + ((1e-6,) if figure.millions else ())
    return any(rounds_to(n * s, figure) for n in numbers for s in scales)


def derived(figure: Figure, quoted: list[Figure]) -> bool:
    values = [f.value for f in quoted if f is not figure and f.kind == "plain" and f.value]
    for a in values:
        for b in values:
            q = a / b
            candidates = [q] if figure.kind == "ratio" else [100 * q, 100 * abs(1 - q)]
            if any(rounds_to(c, figure) for c in candidates):
                return True
    return False


def problems(path: Path) -> list[str]:
    found = []
    blocks = parse_blocks(path)
    for block in blocks:
        figs = figures(block.text)
        where = f"{block.doc}:{block.line}"
        if not figs:
            continue
        sources = block.all_sources()
        if not sources:
            if block.measured:
                found.append(f"{where}: figures {[f.text for f in figs]} in a Measured section cite no results "
                             f"file: {block.text[:100]!r}")
            continue
        numbers: list[float] = []
        for source in sources:
            files = resolve(source)
            if not files:
                found.append(f"{where}: cited path {source} does not exist")
            for file in files:
                numbers += source_numbers(file)
        quoted = [f for b in blocks if b.section == block.section for f in figures(b.text)]
        for fig in figs:
            if found_in_sources(fig, numbers):
                continue
            if fig.kind != "plain" and derived(fig, quoted):
                continue
            found.append(f"{where}: {fig.text!r} is in none of {sources}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_quoted_figure_is_in_the_results_file_it_cites(doc):
    found = problems(doc)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_embedded_image_exists(doc):
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text())
    missing = [i for i in images if not i.startswith("http") and not (doc.parent / i).is_file()]
    assert not missing, f"{doc.name}: {missing} (python scripts/make_plots.py draws the plots)"


def test_the_rules_on_small_cases(tmp_path):
    assert [f.text for f in figures("W1 on the H100 at 2d6d7c1: **11,289** tok/s (×10.1), 47 %, 3.59 ms, 16 seqs")] \
        == ["11,289", "×10.1", "47 %", "3.59"]
    not_figures = ("`kv_blocks 14142` in `benchmarks/results/x.json`, vLLM 0.26, Ray Serve 2.60, ≥ 16,000, "
                   "≤ 1.5 ms, 1.2.3, 2026-11-24, August 2020, HTTP 500, ~42 ms, fp16, GPT-2, [a](b/2048.md)")
    assert figures(not_figures) == []
    fig = figures("11,289")[0]
    assert rounds_to(11288.5, fig) and not rounds_to(11287.4, fig)
    assert found_in_sources(figures("47 %")[0], [0.4704]) and found_in_sources(figures("2.65 TB/s")[0], [2651.9])
    assert found_in_sources(figures("27.7 M tokens")[0], [27705344])
    assert not found_in_sources(figures("27.7")[0], [27705344])
    assert derived(figures("×1.45")[0], figures("18,959 13,084"))
    assert derived(figures("86 %")[0], figures("322 2,309"))
    assert not derived(figures("×1.50")[0], figures("18,959 13,084"))

    doc = tmp_path / "page.md"
    doc.write_text(
        "# Page\n\n## Approach\nNot measured: 3.1 GB.\n\n## Measured impact\nW1 made 9,791 tok/s.\n\n"
        "Out of the table (`benchmarks/results/2026-11-24_W1-W3_H100.json`):\n\n| a | b |\n|---|---|\n"
        "| ours | 11,289 |\n| typo | 11,298 |\n\n"
        "- Cited on its own: 7,438 and 596 (×12.5), (`benchmarks/results/2026-11-24_W1-W3_H100.json`).\n"
        "- A missing file: 1,234 (`benchmarks/results/no-such-file.json`).\n")
    found = problems(doc)
    assert [p.split(":")[1] for p in found] == ["7", "14", "17", "17"], found
    assert "cite no results file" in found[0] and "'11,298'" in found[1] and "does not exist" in found[2]
