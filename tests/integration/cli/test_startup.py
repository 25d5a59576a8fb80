"""Start-up cost: ``import clipad``, ``clipad --version``, ``clipad --help`` and ``clipad`` alone
import no torch (seconds to load), and ``clipad predict --help`` no ``torch._dynamo``; the public
API still resolves through the lazy package root.

Each case runs in a fresh interpreter (this one has torch loaded already) and is judged by the
modules it imported, never by seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import clipad
from clipad.cli import COMMANDS, build_parser

_MARK = "MODULES "


def modules_after(code: str) -> tuple[set[str], str]:
    """Run ``code`` in a fresh interpreter -> (the modules it imported, its output before them).
    ``SystemExit`` (argparse's --help and --version) ends ``code``, not the report."""
    script = (
        "import json, sys\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
        "except SystemExit:\n    pass\n"
        f"print({_MARK!r} + json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out, _, mods = done.stdout.rpartition(_MARK)
    return set(json.loads(mods)), out + done.stderr


def test_import_clipad_imports_no_torch():
    mods, _ = modules_after("import clipad")
    assert "clipad" in mods and "clipad.errors" in mods  # the report sees the import
    assert "torch" not in mods


@pytest.mark.parametrize("argv", [["--version"], ["--help"], []], ids=["version", "help", "no-args"])
def test_top_level_cli_imports_no_torch(argv):
    mods, out = modules_after(f"from clipad.cli import main\nmain({argv!r})")
    assert "torch" not in mods
    assert not any(m.startswith("clipad.methods") for m in mods)
    if argv == ["--version"]:
        assert f"clipad {clipad.__version__}" in out
    else:  # the listing names every subcommand with its summary
        for name, summary in COMMANDS.items():
            assert name in out and summary in out


def test_predict_help_imports_no_dynamo():
    """Method options in the epilog need the registry (torch), not the compiler (torch._dynamo)."""
    mods, out = modules_after("from clipad.cli import main\nmain(['predict', '--help'])")
    assert "method options" in out and "winclip" in out  # the full predict parser was built
    assert "torch" in mods
    assert "torch._dynamo" not in mods


def test_lazy_public_api_resolves():
    from clipad import Detector, create_detector  # noqa: F401  (a from-import goes through __getattr__)

    import clipad.api
    import clipad.metrics
    import clipad.methods

    for name in clipad.__all__:
        assert getattr(clipad, name) is not None, name
    assert set(clipad.__all__) <= set(dir(clipad))
    assert "create_detector" in dir(clipad) and "methods" in dir(clipad)
    assert clipad.create_detector is clipad.api.create_detector
    assert clipad.Detector is clipad.methods.Detector
    assert clipad.methods.get_method("winclip").name == "winclip"  # subpackages stay attributes
    assert clipad.metrics is sys.modules["clipad.eval.metrics"]  # old module paths still answered
    with pytest.raises(AttributeError, match="no_such_name"):
        clipad.no_such_name  # noqa: B018


def test_lazy_names_are_the_real_objects():
    with pytest.warns(clipad.ClipadWarning, match="randomly initialised"):
        det = clipad.create_detector("winclip", backbone="tiny", pretrained=None, device="cpu")
    assert isinstance(det, clipad.Detector)
    assert "winclip" in clipad.list_methods() and "tiny" in clipad.list_backbones()


def test_light_parser_lists_what_the_full_one_builds():
    """``clipad --help`` (no subcommand built) and the full parser offer the same subcommands;
    a subcommand left unbuilt parses none of its options."""
    def names(parser):
        sub = next(a for a in parser._actions if a.dest == "command")
        return list(sub.choices)

    assert names(build_parser([])) == names(build_parser()) == list(COMMANDS)
    assert build_parser(["predict"]).parse_args(["predict", "x.png"]).images == ["x.png"]
    with pytest.raises(SystemExit):
        build_parser(["eval"]).parse_args(["predict", "x.png"])
