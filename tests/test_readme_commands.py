"""Every `fbnas ...` command line in the code blocks of README.md and docs/*.md names a real command, sub-command
and fields: its overrides compose against the command's config (unknown field, wrong type, unknown device -> fail
here). The cheap ones (list, --help) run."""
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fbnas.apps.common import CONF_DIR, device_overrides, renamed
from fbnas.cli import COMMANDS
from fbnas.cli import main as cli
from fbnas.config import RENAMED

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUB_COMMANDS = {"lut": "fbnas.apps.lut", "quantize": "fbnas.apps.quantize"}
MADE_BY_THE_PAGE = {"device=myphone": "device=sd835"}  # docs/latency.md writes conf/device/myphone.yaml first
CONFIG_NAMES = {"search": "search", "train": "train", "hessian": "hessian", "pareto": "pareto", "lut": "lut",
                "quantize": "quantize", "export": "export", "report": "report"}


def _command_lines() -> list[tuple[str, str]]:
    """(page:line, command) of every `fbnas` command in a fenced code block (diagrams left out); `a|b|c`
    alternatives expanded."""
    out = []
    for page in PAGES:
        block: list[tuple[int, str]] = []
        fenced = False
        for n, line in enumerate(page.read_text().splitlines(), start=1):
            if line.startswith("```"):
                if fenced and not any("─" in text for _, text in block):
                    out += [(f"{page.name}:{k}", cmd) for k, text in block for cmd in _commands(text)]
                fenced, block = not fenced, []
            elif fenced:
                block.append((n, line))
    return out


def _commands(line: str) -> list[str]:
    code = re.sub(r"\s+#.*$", "", line).strip()
    out = []
    for part in re.split(r"\s*(?:;|&&)\s*", code):
        m = re.match(r"^(?:\S*/)?fbnas\s+(.*)$", part)
        if m and not part.endswith("\\"):  # a continued line: its first part alone is not the command
            out += _alternatives(m.group(1))
    return out


def _alternatives(cmd: str) -> list[str]:
    m = re.match(r"^(\w+) ((?:[\w-]+\|)+[\w-]+)(.*)$", cmd)  # `list spaces|devices|ops`
    if not m:
        return [cmd]
    return [f"{m.group(1)} {alt}{m.group(3)}" for alt in m.group(2).split("|")]


def _tokens(cmd: str) -> list[str]:
    cmd = re.sub(r"<([^>]*)>", lambda m: re.sub(r"[^\w.]+", "_", m.group(1)) or "X", cmd)  # <arch.json>, <time>
    out = []
    for tok in shlex.split(cmd.replace("...", "X")):
        if re.match(r"^\[[\w.]+=", tok):  # an optional part: [epochs=8 fold_epochs=2], [bits=[8,4]]
            tok = tok[1:]
        if tok.count("]") > tok.count("["):
            tok = tok[:-1]
        if tok != "X":
            out.append(tok)
    return out


COMMAND_LINES = _command_lines()


def test_the_pages_have_commands_of_every_kind():
    used = {c.split()[0] for _, c in COMMAND_LINES}
    assert set(COMMANDS) <= used, set(COMMANDS) - used
    assert len(COMMAND_LINES) > 60


@pytest.mark.parametrize("where, cmd", COMMAND_LINES, ids=[f"{w} {c[:60]}" for w, c in COMMAND_LINES])
def test_documented_command_parses(where, cmd, capsys):
    _check(where, cmd, capsys)


@pytest.mark.parametrize("cmd", ["search epochz=3", "train arch=a.json epochs=two", "lut biuld space=fmnist",
                                 "search device=nodevice", "hessian dataset=synthetic"])
def test_a_wrong_command_line_fails_the_check(cmd, capsys):
    with pytest.raises((Exception, SystemExit)):
        _check("here", cmd, capsys)


def _check(where: str, cmd: str, capsys) -> None:
    toks = _tokens(cmd)
    name, rest = toks[0], toks[1:]
    assert name in COMMANDS, f"{where}: unknown command {name!r}"
    importlib.import_module(COMMANDS[name])  # registers its config schema
    if name == "list":
        assert cli(toks) == 0, capsys.readouterr().err
        return
    if name == "info":
        assert len(rest) == 1 and rest[0].endswith(".json"), f"{where}: fbnas info <arch.json>"
        return
    if rest[:1] in (["--help"], ["-h"]) or rest[-1:] in (["--help"], ["-h"]):
        assert cli(toks) == 0, capsys.readouterr().err
        return
    if name in SUB_COMMANDS:
        actions = importlib.import_module(SUB_COMMANDS[name]).ACTIONS
        assert rest and rest[0] in actions, f"{where}: {name} needs one of {actions}, got {rest[:1]}"
        rest = [f"action={rest[0]}"] + rest[1:]
    overrides = [MADE_BY_THE_PAGE.get(t, t) for t in rest if not t.startswith("-")]  # -m: Hydra's flags
    overrides = device_overrides(renamed(overrides, RENAMED.get(name, {})))
    assert all("=" in o for o in overrides), f"{where}: not key=value: {overrides}"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        compose(CONFIG_NAMES[name], overrides=[o if "[" in o else o.split(",")[0] for o in overrides])  # -m a,b
    err = capsys.readouterr().err
    assert "is now" not in err, f"{where}: documents an old field name: {err}"
