"""The CLI shell: help, version, the not-implemented path, and config errors as one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfinstruct import __version__, cli


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfinstruct.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("generate", "filter", "export", "train", "evaluate", "stats", "split"):
        assert f"    {name}" in out.stdout


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"selfinstruct {__version__}"


def test_help_does_not_import_torch():
    code = (
        "import sys; from selfinstruct import cli; cli.build_parser('train'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_unbuilt_command_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "future", cli.Command("later", "selfinstruct.not_there:Cfg:run"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["future"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: 'future' is not implemented yet"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["filter", "x.jsonl", "--threshold", "high"], "invalid setting"),
        (["train", "--config", "missing.toml"], "missing.toml: config file not found"),
        (["generate", "--concurrency", "-"], "invalid setting teacher.concurrency from --concurrency"),
    ],
)
def test_bad_settings_are_one_line_exit_2(args, message, tmp_path):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unknown_toml_table_and_print_config(tmp_path):
    (tmp_path / "run.toml").write_text("[trian]\nepochs = 1\n")
    out = run_cli("train", "--config", "run.toml", cwd=tmp_path)
    assert out.returncode == 2 and "unknown table or key 'trian'" in out.stderr
    (tmp_path / "run.toml").write_text("[filters]\nthreshold = 0.5\n")
    out = run_cli("filter", "in.jsonl", "--config", "run.toml", "--print-config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "threshold = 0.5" in out.stdout
