"""The documents against the code: links and anchors resolve, every exit status written in the
Markdown agrees with launch.status.ExitStatus, and the commands, paths and config fields they
name exist. Reads files only: fast tier."""

import os
import re
import tomllib

import pytest

from configs import default
from launch.status import ExitStatus
from tests import helpers

DOCS = os.path.join(helpers.REPO, "docs")
PAGES = ["README.md", "BUILD.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md")
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
STATUS_NAMES = {status.name.lower().replace("_", " "): status for status in ExitStatus}
# "75 (preempted)", "2 (bad input: ...)": how the pages write a status, as launch.status.describe
# does; the name after the number must be that number's.
STATUS_MENTION = re.compile(r"\b(\d{1,3}) \((" + "|".join(STATUS_NAMES) + r")\b")
FIRST_PARTY = ("launch", "pipeline", "resnet", "tools", "configs", "tests")
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:" + "|".join(FIRST_PARTY) + r")/[\w./-]*\w/?)")
MODULE = re.compile(r"\bpython3? -m ((?:" + "|".join(FIRST_PARTY) + r")(?:\.\w+)*)")
CONFIG_FIELD = re.compile(r"(?<![\w/.-])(checkpoint|data|distributed|eval|model|train)\.(\w+)\b")
NOT_CONFIG = {"py", "md", "json", "jsonl"}  # train.py, model.json: files, not fields
HISTORY = re.compile(
    r"\(before:|\bas before\b|\bearlier versions?\b|\bno longer\b|\bthe issue\b|\bis now\b"
    r"|\bwas \w+, is\b",
    flags=re.I,
)


def _read(page: str) -> str:
    with open(os.path.join(helpers.REPO, page), errors="replace") as f:
        return f.read()


def _outside_code(text: str) -> str:
    """The text with fenced code blocks blanked (their '#' lines are not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: str) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _outside_code(_read(page)), flags=re.M):
        slug = anchor(heading)
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def _tables(text: str):
    """Each Markdown table as (header cells, rows of cells)."""
    for block in re.findall(r"(?:^\|.*\|[ \t]*\n)+", text, flags=re.M):
        rows = [
            [c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
        ]
        yield rows[0], [r for r in rows[2:] if r]


def test_the_documents_are_at_most_five_pages():
    assert 1 <= len(PAGES) - 2 <= 5, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    for target in LINK.findall(_outside_code(_read(page))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(helpers.REPO, resolved)), f"{page}: {target}"
        if fragment:
            assert resolved.endswith(".md"), f"{page}: {target}"
            assert fragment in anchors(resolved), f"{page}: {target} (no such heading)"


def test_the_anchor_rule_matches_github():
    assert (
        anchor("Stopping: signals, agreement, deadlines") == "stopping-signals-agreement-deadlines"
    )
    assert anchor("Unattended runs: `supervise`") == "unattended-runs-supervise"
    assert anchor("TPU slices on GKE (JobSet)") == "tpu-slices-on-gke-jobset"


def test_the_exit_status_table_lists_every_status_with_its_name():
    tables = [
        rows
        for page in PAGES
        for header, rows in _tables(_read(page))
        if header[0].lower() == "exit status"
    ]
    assert tables, "no table headed 'Exit status' in the documents"
    for rows in tables:
        listed = {int(r[0]): r[1] for r in rows if r[0].isdigit()}
        assert set(listed) == {int(s) for s in ExitStatus}, listed
        for code, meaning in listed.items():
            name = ExitStatus(code).name.lower().replace("_", " ")
            assert meaning.lower().startswith(name), (code, meaning)
        assert any(r[0] == "128+N" for r in rows)


@pytest.mark.parametrize("page", PAGES)
def test_every_exit_status_written_as_number_and_name_matches_the_enum(page):
    for number, name in STATUS_MENTION.findall(_read(page)):
        assert int(number) == STATUS_NAMES[name], f"{page}: '{number} ({name})'"


def test_the_status_mentions_are_checked_somewhere():
    mentions = [m for page in PAGES for m in STATUS_MENTION.findall(_read(page))]
    assert {STATUS_NAMES[name] for _, name in mentions} == set(ExitStatus)


@pytest.mark.parametrize("page", PAGES)
def test_every_repository_path_and_module_named_exists(page):
    text = _read(page)
    for path in REPO_PATH.findall(text):
        if re.search(r"\b[A-Z]{2,}\b", path):
            continue  # a placeholder: configs/OTHER.py
        assert os.path.exists(os.path.join(helpers.REPO, path)), f"{page}: {path}"
    for module in MODULE.findall(text):
        base = os.path.join(helpers.REPO, *module.split("."))
        assert os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__main__.py")), (
            f"{page}: python -m {module}"
        )


@pytest.mark.parametrize("page", PAGES)
def test_every_config_field_named_exists(page):
    config = default.get_config()
    for section, field in CONFIG_FIELD.findall(_read(page)):
        if field not in NOT_CONFIG:
            assert field in config[section], f"{page}: {section}.{field}"


@pytest.mark.parametrize("page", PAGES)
def test_no_history_in_the_documents(page):
    found = [m.group(0) for m in HISTORY.finditer(_read(page))]
    assert not found, f"{page}: {found}"


def test_build_md_names_every_extra_and_ci_runs_its_test_command():
    with open(os.path.join(helpers.REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    build = _read("BUILD.md")
    for extra in extras:
        assert f"'.[{extra}]'" in build or f"`{extra}`" in build, extra
    ci = [line for line in _read(".ci/run").splitlines() if "pytest" in line]
    assert ci and all(line.strip() in build for line in ci), ci


def test_the_licence_is_the_one_pyproject_names():
    with open(os.path.join(helpers.REPO, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["license"] == {"text": "Apache-2.0"}
    licence = _read("LICENSE")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence


def _docs_named_in_code():
    """(source file, page) for every Markdown page under docs that a source file or CI names."""
    for top in FIRST_PARTY + (".ci",):
        for root, _, files in os.walk(os.path.join(helpers.REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh", ".sbatch")) or name == "run":
                    source = os.path.relpath(os.path.join(root, name), helpers.REPO)
                    for doc in re.findall(r"\bdocs/[\w/.-]+\.md\b", _read(source)):
                        yield source, doc


def test_every_document_the_code_names_exists():
    named = set(_docs_named_in_code())
    assert named, "no reference to docs/ found in the code"
    missing = [(source, doc) for source, doc in named if not os.path.exists(doc_path(doc))]
    assert not missing, missing


def doc_path(doc: str) -> str:
    return os.path.join(helpers.REPO, doc)
