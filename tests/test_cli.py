"""`specedit apply | convert | bench` as a user runs them (in-process, through cli.main)."""

import warnings

import pytest

from helpers import make_text_checkpoint
from specedit import cli

CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_text_checkpoint(tmp_path_factory.mktemp("cli")))


def test_apply_writes_output_and_diff(model, tmp_path, capsys):
    src = tmp_path / "add.py"
    src.write_text(CODE)
    out = tmp_path / "out.py"
    args = ["apply", str(src), "Add type hints.", "--model", model, "--max-new-tokens", "20"]
    assert cli.main([*args, "-o", str(out)]) == 0
    assert out.is_file() and src.read_text() == CODE
    assert cli.main(["apply", str(src), "Add type hints.", "--model", model, "--diff", "--max-new-tokens", "20",
                     "--plain"]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith("--- a/file") or diff == ""


def test_apply_in_place_is_atomic_and_keeps_mode(model, tmp_path):
    src = tmp_path / "add.py"
    src.write_text(CODE)
    src.chmod(0o640)
    args = ["apply", str(src), "Add type hints.", "--model", model, "--max-new-tokens", "20"]
    assert cli.main([*args, "--in-place"]) == 0
    assert oct(src.stat().st_mode & 0o777) == "0o640"
    assert [p.name for p in tmp_path.iterdir()] == ["add.py"]  # no temp file left


def test_non_utf8_file_is_refused_and_untouched(model, tmp_path, capsys):
    src = tmp_path / "latin1.c"
    src.write_bytes(b"int caf\xe9 = 1;\n")
    assert cli.main(["apply", str(src), "x", "--model", model, "--in-place"]) == 2
    assert "not UTF-8 text (byte 7" in capsys.readouterr().err
    assert src.read_bytes() == b"int caf\xe9 = 1;\n"


def test_missing_file_and_bad_model(model, tmp_path, capsys):
    assert cli.main(["apply", str(tmp_path / "nope.py"), "x", "--model", model]) == 2
    assert "nope.py: no such file" in capsys.readouterr().err
    src = tmp_path / "a.py"
    src.write_text(CODE)
    assert cli.main(["apply", str(src), "x", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_convert_rejects_non_gguf(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert cli.main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert "x.gguf" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_reports_identical_outputs(model, tmp_path, capsys):
    src = tmp_path / "add.py"
    src.write_text(CODE)
    assert cli.main(["bench", str(src), "Add type hints.", "--model", model]) == 0
    assert "outputs identical: True" in capsys.readouterr().out


def test_failed_extension_build_is_one_line(model, tmp_path, monkeypatch):
    from specedit.kernels.cpu import build

    def fail():
        raise build.BuildError("building the CPU kernels failed (compiler c++): error: boom; full log: /x/build.log")

    monkeypatch.setattr(build, "load", fail)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    src = tmp_path / "add.py"
    src.write_text(CODE)
    with pytest.warns(UserWarning, match="CPU kernels not used") as record:
        cli.main(["apply", str(src), "Add type hints.", "--model", model, "--max-new-tokens", "5", "--plain"])
    shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in record]
    assert len(shown) == 1 and shown[0].count("\n") == 1 and "full log: /x/build.log" in shown[0]
