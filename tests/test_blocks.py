"""Shared code lives once, in blocks/, and blocks/build.py writes it into the scripts: every copy
equals its source, a hand edit or an unregenerated source fails the check with the script and the
command named, a name a block reads at import time must be defined before it, and outside the
generated regions no two scripts share ten identical lines."""
import ast
import itertools
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "blocks"))
import build  # noqa: E402

SAME_RUN = 10          # the bound: no run of this many identical lines in two scripts
OWN_CODE_WITHIN = {"tg_bot.py": 300, "system_prompt.py": 200, "create_dataset.py": 200}


@pytest.fixture
def tree(tmp_path, repo_root):
    """A copy of the scripts and blocks to break."""
    for script in repo_root.glob("*.py"):
        shutil.copy(script, tmp_path / script.name)
    shutil.copytree(repo_root / "blocks", tmp_path / "blocks", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_check(root, *extra):
    return subprocess.run([sys.executable, str(root / "blocks" / "build.py"), "--check", *extra],
                          capture_output=True, text=True, cwd=root)


def replace_once(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert text.count(old) >= 1, (path.name, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_every_script_holds_its_blocks_as_their_sources_are(repo_root):
    assert build.build(str(repo_root), check=True) == []
    for script, names in build.HOSTS.items():
        lines = (repo_root / script).read_text(encoding="utf-8").split("\n")
        own, region, footer = build.split_host(script, lines)
        assert build.blocks_in(region) == names, script
        assert footer[0] == build.FOOTER and not any(line.startswith("def ") for line in footer), script


def test_a_changed_block_source_fails_the_check_until_regenerated(tree):
    assert run_check(tree).returncode == 0
    block = tree / "blocks" / "decoding.py"
    source = block.read_text(encoding="utf-8")
    line = next(line for line in source.splitlines() if line.startswith("def "))
    replace_once(block, line, line + "  # changed")
    result = run_check(tree)
    assert result.returncode == 1
    named = {line.split(":")[1].strip() for line in result.stderr.splitlines()}
    assert named == {script for script, names in build.HOSTS.items() if "decoding" in names}
    assert all("blocks/decoding.py" in line and "make blocks" in line for line in result.stderr.splitlines())
    # the generator writes the new line into every host, and the check is content again
    subprocess.run([sys.executable, str(tree / "blocks" / "build.py")], check=True, capture_output=True)
    assert run_check(tree).returncode == 0
    assert line + "  # changed" in (tree / "evaluate.py").read_text(encoding="utf-8")


def test_a_copy_edited_by_hand_fails_naming_that_script(tree):
    replace_once(tree / "tg_bot.py", "def fit_prompt(", "def fit_prompt_edited(")
    result = run_check(tree)
    assert result.returncode == 1
    assert result.stderr.startswith("blocks/build.py: tg_bot.py: its copy of blocks/prompt_rule.py differs")
    assert len(result.stderr.splitlines()) == 1 and "make blocks" in result.stderr


def test_an_edited_banner_or_a_stray_marker_is_refused(tree):
    replace_once(tree / "perplexity.py", build.BANNER[1], "# Generated blocks, edited")
    stray = tree / "parser_dataset.py"
    stray.write_text(stray.read_text(encoding="utf-8") + "\n" + build.start_marker("common") + "\n", encoding="utf-8")
    errors = run_check(tree).stderr
    assert "perplexity.py: no generated-blocks banner" in errors
    assert "parser_dataset.py: holds generated blocks but is not listed" in errors


def test_a_name_read_at_import_time_must_be_defined_before_it(tree):
    # a block whose top level reads a setting its host never defines
    replace_once(tree / "blocks" / "decoding.py", '"""\n', '"""\nDECODING_LIMIT = UNDEFINED_SETTING + 1\n')
    # a script whose own part reads, at import time, a name only a later block defines
    replace_once(tree / "perplexity.py", "\nclass UserError(", "\nRULE = fit_prompt\n\n\nclass UserError(")
    errors = run_check(tree).stderr
    assert "blocks/decoding.py: line" in errors and "reads UNDEFINED_SETTING at import time" in errors
    assert "perplexity.py: line" in errors and "reads fit_prompt at import time" in errors
    # names read only when a function runs are fine wherever they are defined
    probe = ast.parse("def later():\n    return fit_prompt\nX = [y for y in range(3)]\n")
    assert build.names_read_at_import(probe.body) == [("range", 3)]


def own_lines(path):
    """A script's lines outside its generated region, stripped, blank lines dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if path.name in build.HOSTS:
        own, _, footer = build.split_host(path.name, lines)
        lines = own + footer
    return [line.strip() for line in lines if line.strip()]


def test_no_two_scripts_share_ten_identical_lines_outside_the_blocks(repo_root):
    runs = {}
    for path in sorted(repo_root.glob("*.py")):
        lines = own_lines(path)
        for i in range(len(lines) - SAME_RUN + 1):
            runs.setdefault(tuple(lines[i:i + SAME_RUN]), set()).add(path.name)
    shared = {run: names for run, names in runs.items() if len(names) > 1}
    # the footer every script ends with is the kit's pattern, not shared code
    shared = {run: names for run, names in shared.items() if build.FOOTER not in run}
    report = sorted({(tuple(sorted(names)), run[0]) for run, names in shared.items()})
    assert not report, "\n".join(f"{' and '.join(names)} share a run starting {first!r}" for names, first in report[:20])


def test_each_script_reads_as_its_own_stage_first(repo_root):
    for script, limit in OWN_CODE_WITHIN.items():
        lines = (repo_root / script).read_text(encoding="utf-8").split("\n")
        first = next(i for i, line in enumerate(lines, 1) if line.startswith(("def ", "class ")))
        assert first <= limit, f"{script}: its own code starts at line {first}"
        assert lines.index(build.BANNER[1]) > lines.index(next(l for l in lines if l.startswith("def main(")))


def test_every_pair_of_hosts_reads_one_source(repo_root):
    """Two hosts of a block hold the very same text for it (what the copies used to be checked for)."""
    for name in {n for names in build.HOSTS.values() for n in names}:
        hosts = [s for s, names in build.HOSTS.items() if name in names]
        texts = []
        for script in hosts:
            lines = (repo_root / script).read_text(encoding="utf-8").split("\n")
            texts.append(build.blocks_region(build.split_host(script, lines)[1], name))
        for a, b in itertools.combinations(texts, 2):
            assert a == b == build.block_source(name, str(repo_root)), name
