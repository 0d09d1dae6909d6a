"""The documentation: it builds with every warning an error, its configuration page says what
``tally.config`` does, and the README stays short with every relative link pointing at a file.

Each check is a function that returns the problems it finds in a text; the tests run them on the real
files and expect none, and run them once more on a spoiled copy to show that they do find problems.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tally import errors
from tally.config import CHECKS, DEFAULTS
from tally.stores import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "config.md"
HTTP_PAGE = DOCS / "http.md"
README = ROOT / "README.md"
README_MAX_LINES = 300

KEY = r"[A-Z][A-Z0-9_]*[A-Z0-9]"
#: Tally's own keys: anything documented under these prefixes must be a key of DEFAULTS.
TALLY_KEY = re.compile(r"(?:COUNTER|VALUE)_[A-Z0-9_]*[A-Z0-9]")


# -- reading Markdown ---------------------------------------------------------------------------------


def outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def key_sections(text: str) -> list[tuple[str, str]]:
    """``(KEY, body)`` for every ``### KEY`` heading, in page order (a key twice: twice)."""
    sections, key, body = [], None, []
    for line in outside_code(text):
        if line.startswith("#"):
            if key is not None:
                sections.append((key, "\n".join(body)))
            found = re.fullmatch(rf"###\s+`?({KEY})`?\s*", line)
            key, body = (found.group(1) if found else None), []
        elif key is not None:
            body.append(line)
    if key is not None:
        sections.append((key, "\n".join(body)))
    return sections


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row (header and separator rows left out)."""
    rows = []
    for line in outside_code(text):
        if not line.startswith("|") or re.fullmatch(r"[|\s:-]+", line):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(cells)
    return rows


def table_keys(text: str) -> list[str]:
    """The keys a table documents: every ``KEY`` in backticks in a row's first cell."""
    keys = []
    for cells in table_rows(text):
        keys += re.findall(rf"`({KEY})`", cells[0])
    return keys


def documented_keys(text: str) -> list[str]:
    return [key for key, _ in key_sections(text)] + table_keys(text)


def field(body: str, name: str) -> str | None:
    """The text of a ``- Name: ...`` line of a key's section, or ``None``."""
    found = re.search(rf"^- {name}:\s*(.+?)\s*$", body, re.MULTILINE)
    return found.group(1) if found else None


def as_value(text: str) -> Any:
    """A documented default as a Python value: `None`/`none`/`unset`, `True`/`true`, numbers, strings
    (quoted or not)."""
    text = text.strip().strip("`").strip()
    words = {"none": None, "null": None, "unset": None, "true": True, "false": False}
    if text.lower() in words:
        return words[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def same_value(documented: Any, actual: Any) -> bool:
    if isinstance(documented, bool) or isinstance(actual, bool) or documented is None or actual is None:
        return documented is actual
    numbers = (int, float)
    if isinstance(documented, numbers) and isinstance(actual, numbers):
        return documented == actual
    return type(documented) is type(actual) and documented == actual


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def slug(heading: str) -> str:
    """The anchor GitHub and MyST (``myst_heading_anchors``) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(line.lstrip("#")) for line in outside_code(text) if re.match(r"#{1,6} ", line)}


# -- the checks -----------------------------------------------------------------------------------------


def config_key_problems(text: str) -> list[str]:
    """Every key of DEFAULTS documented exactly once, as a section of its own; no other Tally key."""
    problems = []
    documented = Counter(documented_keys(text))
    sections = {key for key, _ in key_sections(text)}
    for key in DEFAULTS:
        if documented[key] != 1:
            problems.append(f"{key} is documented {documented[key]} times, not once")
        elif key not in sections:
            problems.append(f"{key} has no '### {key}' section")
    for key in sorted(documented):
        if TALLY_KEY.fullmatch(key) and key not in DEFAULTS:
            problems.append(f"{key} is documented but is not a key of tally.config.DEFAULTS")
    return problems


def config_default_problems(text: str) -> list[str]:
    """The default each section shows is ``DEFAULTS[key]``."""
    problems = []
    for key, body in key_sections(text):
        if key not in DEFAULTS:
            continue
        shown = field(body, "Default")
        if shown is None:
            problems.append(f"{key}: no '- Default: `...`' line")
        elif not same_value(as_value(shown), DEFAULTS[key]):
            problems.append(f"{key}: the page says the default is {shown}; the code has {DEFAULTS[key]!r}")
    return problems


def config_check_problems(text: str) -> list[str]:
    """What each section says is accepted is what ``tally.config.CHECKS`` says it expects."""
    problems = []
    for key, body in key_sections(text):
        if key not in CHECKS:
            continue
        shown, expected = field(body, "Checked"), CHECKS[key][1]
        if shown is None:
            problems.append(f"{key}: no '- Checked: ...' line")
            continue
        if key == "COUNTER_STORE":
            # The code lists the stores registered here (one whose library is missing is not):
            # the page must say the same sentence and name at least those.
            expected = expected.partition(": ")[0]
            named = [name for name, cls in REGISTRY.items() if not cls.cache_types]
            listed = re.split(r"[,\s]+", plain(shown).partition(": ")[2])
            problems += [f"{key}: the store {name!r} is not listed" for name in named if name not in listed]
            shown = plain(shown).partition(": ")[0]
        if plain(shown) != plain(expected):
            problems.append(f"{key}: the page says it accepts {shown!r}; the code checks for {expected!r}")
    return problems


def mentioned_key_problems(texts: dict[str, str]) -> list[str]:
    """Every Tally key named anywhere (``COUNTER_TIMEOUT``, ``FLASK_COUNTER_STORE=...``) is a key of
    DEFAULTS: a key renamed or removed in the code leaves no stale mention behind."""
    mentioned = re.compile(r"(?<![A-Z0-9_])(?:FLASK_)?((?:COUNTER|VALUE)_[A-Z0-9_]*[A-Z0-9])(?![A-Z0-9_])")
    return [
        f"{name} names {key}, which is not a key of tally.config.DEFAULTS"
        for name, text in texts.items()
        for key in sorted(set(mentioned.findall(text)))
        if key not in DEFAULTS
    ]


def demo_key_problems(text: str) -> list[str]:
    """Every key of the demo's settings.toml and of its own checks (settings.CHECKS) is documented."""
    from settings import CHECKS as DEMO_CHECKS

    shipped = tomllib.loads((ROOT / "settings.toml").read_text())
    documented = set(documented_keys(text))
    return [f"{key} (the demo's) is not documented" for key in sorted({*shipped, *DEMO_CHECKS} - documented)]


def error_table_problems(text: str) -> list[str]:
    """The HTTP page's table of error codes: one row per TallyError class, with its code and status."""
    classes = {
        cls.__name__: cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.TallyError) and cls is not errors.TallyError
    }
    problems, seen = [], set()
    for cells in table_rows(text):
        if len(cells) < 3 or (name := cells[2].strip("`")) not in classes:
            continue
        seen.add(name)
        cls, code, status = classes[name], cells[0].strip("`"), cells[1]
        if (code, status) != (cls.code, str(cls.status)):
            problems.append(f"{name}: the page says {code} {status}; the code has {cls.code} {cls.status}")
    problems += [f"{name} is missing from the error table" for name in sorted(set(classes) - seen)]
    return problems


def readme_problems(text: str, root: Path = ROOT) -> list[str]:
    """At most README_MAX_LINES lines; every relative link (and its #anchor, in a Markdown file)
    points at something that exists."""
    problems = []
    lines = text.count("\n") + (not text.endswith("\n"))
    if lines > README_MAX_LINES:
        problems.append(f"the README has {lines} lines, more than {README_MAX_LINES}")
    for target in re.findall(r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL, or an anchor of the README itself
        path, _, anchor = target.partition("#")
        if not (root / path).exists():
            problems.append(f"the README links to {path}, which does not exist")
        elif anchor and path.endswith(".md") and anchor not in anchors((root / path).read_text()):
            problems.append(f"the README links to {target}, but {path} has no such heading")
    return problems


# -- the tests ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="Sphinx is not installed: pip install -e '.[docs]' (make docs and make test install it)",
)
def test_the_docs_build_with_every_warning_an_error(tmp_path):
    out = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"sphinx-build failed:\n{build.stdout[-3000:]}\n{build.stderr[-5000:]}"
    for page in DOCS.glob("*.md"):
        assert (out / f"{page.stem}.html").is_file(), f"{page.name} was not built"
    for image in DOCS.glob("*.png"):
        assert (out / "_images" / image.name).is_file(), f"{image.name} is not shown on any page"
    assert "tally.extension.Counters" in (out / "api.html").read_text(), "autodoc documented nothing"


def test_the_config_page_documents_every_tally_key_once():
    assert config_key_problems(CONFIG_PAGE.read_text()) == []


def test_the_config_page_shows_the_defaults_of_the_code():
    assert config_default_problems(CONFIG_PAGE.read_text()) == []


def test_the_config_page_shows_what_the_code_checks():
    assert config_check_problems(CONFIG_PAGE.read_text()) == []


def test_every_tally_key_the_docs_name_exists():
    pages = {path.relative_to(ROOT).as_posix(): path.read_text() for path in [README, *DOCS.glob("*.md")]}
    assert mentioned_key_problems(pages) == []


def test_the_config_page_documents_the_demo_keys():
    assert demo_key_problems(CONFIG_PAGE.read_text()) == []


def test_the_http_page_lists_every_error_with_its_code_and_status():
    assert error_table_problems(HTTP_PAGE.read_text()) == []


def test_the_readme_is_short_and_its_links_lead_somewhere():
    assert readme_problems(README.read_text()) == []


def test_the_checks_find_a_spoiled_page():
    """Each check fails on a copy of its page with a mistake in it."""
    page = CONFIG_PAGE.read_text()
    fake = "\n### COUNTER_FAKE\n\n- Default: `1`\n- Checked: true or false\n\nNot a key.\n"
    assert "COUNTER_FAKE is documented" in " ".join(config_key_problems(page + fake))
    without = re.sub(r"### COUNTER_FSYNC\n.*?(?=\n### )", "", page, flags=re.DOTALL)
    assert "COUNTER_FSYNC is documented 0 times" in " ".join(config_key_problems(without))
    twice = page + "\n| `COUNTER_TIMEOUT` | 1 | again |\n"
    assert "COUNTER_TIMEOUT is documented 2 times" in " ".join(config_key_problems(twice))

    wrong_default = page.replace("- Default: `0.5`", "- Default: `0.25`", 1)
    assert any("COUNTER_TIMEOUT" in p for p in config_default_problems(wrong_default))
    as_string = page.replace("- Default: `False`", '- Default: `"False"`', 1)
    assert config_default_problems(as_string) != []
    wrong_check = page.replace("- Checked: an integer >= 1", "- Checked: an integer >= 0", 1)
    assert any("COUNTER_POOL_SIZE" in p for p in config_check_problems(wrong_check))
    no_store = page.replace("the name of a store: manager, sql", "the name of a store: sql", 1)
    assert config_check_problems(no_store) != []
    assert mentioned_key_problems({"page": "set `FLASK_COUNTER_TIMEOUTS=1`, not `COUNTER_*`"}) == [
        "page names COUNTER_TIMEOUTS, which is not a key of tally.config.DEFAULTS"
    ]
    no_token = re.sub(r"^\| `METRICS_TOKEN` .*\n", "", page, flags=re.MULTILINE)
    assert demo_key_problems(no_token) == ["METRICS_TOKEN (the demo's) is not documented"]

    http = HTTP_PAGE.read_text()
    assert error_table_problems(http.replace("| `overflow` | 409 |", "| `overflow` | 400 |")) != []
    assert error_table_problems(re.sub(r"^\| `conflict` .*\n", "", http, flags=re.MULTILINE)) == [
        "Conflict is missing from the error table"
    ]

    readme = README.read_text()
    assert readme_problems(readme + "x\n" * README_MAX_LINES) != []
    assert readme_problems(readme + "\n[gone](docs/no-such-page.md)\n") != []
    assert readme_problems(readme + "\n[gone](docs/config.md#no-such-heading)\n") != []


def test_the_parsers_read_values_as_the_code_has_them():
    assert same_value(as_value("`None`"), None) and same_value(as_value("unset"), None)
    assert same_value(as_value("`true`"), True) and not same_value(as_value("`1`"), True)
    assert same_value(as_value("`65536`"), 65536) and same_value(as_value("65_536"), 65536)
    assert same_value(as_value("`0.5`"), 0.5) and not same_value(as_value("`0`"), False)
    assert same_value(as_value('`"tally:"`'), "tally:") and not same_value(as_value("`5`"), "5")
    assert slug("Redis Sentinel and Redis Cluster") == "redis-sentinel-and-redis-cluster"
