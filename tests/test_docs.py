"""The documentation: a short README, links that resolve, a scenario reference that cannot drift."""

import re

import pytest
from conftest import ROOT

from fedtiny.scenario import schema_rows
from fedtiny.tools.reference import choices, render_reference, toml_literal

README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "guide" / "scenario-reference.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]

# Pages another change adds; a link to one is accepted while the file does not exist yet. Once it
# exists, its links and anchors are checked like every other page's.

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), with an optional "title"; <target> in angle brackets too.
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (their brackets are not links)."""
    return _CODE_SPAN.sub("``", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target of a Markdown text, outside code."""
    prose = _prose(text)
    return [m.group(1) for m in _INLINE.finditer(prose)] + [m.group(1) for m in _REFDEF.finditer(prose)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("", text)):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def test_slugs_follow_github():
    assert slug("Stopping and resuming, seeds, large fleets") == "stopping-and-resuming-seeds-large-fleets"
    assert slug("`fedtiny memory`") == "fedtiny-memory"
    assert slug("`[run]`") == "run"
    assert slug("What a client runs (int8, QAS)") == "what-a-client-runs-int8-qas"
    assert slug("TLS and SuperNode authentication") == "tls-and-supernode-authentication"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## B.c\n") == {"a", "a-1", "bc"}


def test_links_are_found_outside_code_only():
    text = "see [the guide](docs/guide/index.md#x), ![fig](a.png)\n`[not](a link)`\n```\n[no](b.md)\n```\n"
    assert links(text) == ["docs/guide/index.md#x", "a.png"]


def test_readme_is_short_and_states_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, f"README.md has {len(text.splitlines())} lines (at most 300)"
    assert "make test" in text and "make demo" in text


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    problems = []
    for target in links(page.read_text()):
        if not target or _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_guide_pages_are_linked_from_the_index():
    index = (ROOT / "docs" / "guide" / "index.md").read_text()
    linked = {t.partition("#")[0] for t in links(index)}
    pages = {p.name for p in (ROOT / "docs" / "guide").glob("*.md")} - {"index.md"}
    assert pages <= linked, f"guide pages missing from docs/guide/index.md: {sorted(pages - linked)}"


def test_reference_lists_every_key():
    text = REFERENCE.read_text()
    missing = [key for key, *_ in schema_rows() if f"| `{key}` |" not in text]
    assert not missing, f"keys missing from {REFERENCE.relative_to(ROOT)}: {missing}"


def test_reference_is_the_generators_output():
    assert REFERENCE.read_text() == render_reference(), (
        "docs/guide/scenario-reference.md differs from the schema: run `make docs`"
    )


def test_reference_defaults_are_toml():
    assert toml_literal("x") == '"x"' and toml_literal(True) == "true" and toml_literal([0, 1]) == "[0, 1]"
    assert toml_literal({"crash": 0.05}) == '{"crash" = 0.05}' and toml_literal(1e-5) == "1e-05"


def test_reference_states_the_validators_choices():
    allowed = choices()
    assert {"dense", "sparse"} <= set(allowed["compression.uplink"]) and "" in allowed["device.radio"]
    assert '`"sparse"`' in render_reference()
