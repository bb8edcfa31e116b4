"""The docs' own check: every command in a fenced block of README.md and docs/*.md names a program that
exists and only flags its --help lists; every relative link resolves; the layout page names every module."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def commands(page: Path):
    """(page, line) of each shell command in the page's ```bash blocks, continuation lines joined."""
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" # ")[0].strip()
            if command and not command.startswith("#"):
                yield command


def program(command: str):
    """The --help invocation that lists the command's flags, and the part of the command they follow; None
    for programs that are not protmask's (pip, ProteinMPNN's helper scripts, ...)."""
    words = command.split()
    names = [w.split("/")[-1] for w in words]
    if "train_accelerate.py" in names:
        at = names.index("train_accelerate.py")
        return ("train",), words[at + 1:]
    if "protmask.train" in words:
        return ("train",), words[words.index("protmask.train") + 1:]
    if "protmask" in names:
        at = names.index("protmask")
        sub = words[at + 1]
        return (("train",) if sub == "train" else ("cli", sub)), words[at + 2:]
    bench = [w for w in words if w.startswith("bench/") and w.endswith(".py")]
    if bench and words[0].split("/")[-1].startswith("python"):
        return ("bench", bench[0]), words[words.index(bench[0]) + 1:]
    return None


@functools.lru_cache(maxsize=None)
def help_text(kind: tuple) -> str:
    if kind == ("train",):
        argv = [str(ROOT / "train_accelerate.py"), "--help"]
    elif kind[0] == "cli":
        argv = ["-m", "protmask.cli", kind[1], "--help"]
    else:
        argv = [str(ROOT / kind[1]), "--help"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr[-500:]}"
    return done.stdout


def all_commands():
    return [(page.relative_to(ROOT), command) for page in PAGES for command in commands(page)]


def test_every_documented_command_exists_with_the_flags_it_shows():
    checked, wrong = 0, []
    for page, command in all_commands():
        found = program(command)
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.M), (page, command)
            continue
        if found is None:
            continue
        kind, rest = found
        text = help_text(kind)
        for flag in FLAG.findall(" ".join(rest)):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                wrong.append(f"{page}: {flag} in `{command[:90]}`")
        checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 30  # the docs do show commands


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                         for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                if anchor not in slugs:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_layout_page_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "protmask").rglob("*.py"))
               if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/layout.md does not name: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_link_back_to_the_index(page):
    if page.name != "README.md":
        assert "(../README.md)" in page.read_text()
