"""Property-based: any text a user hands `prepare` (as a text file or JSONL) or `generate` (as
--prompt), including invalid UTF-8, lone surrogates, control characters, empty and huge lines,
ends in success or one line `jaxdp: error: ...` (exit status 2), never a traceback."""

import json
import os

from cli_inprocess import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

SPECIAL = ["", "\ud800", "a\udfffb", "\x00", "\x1b[31mred\x1b[0m", "\r", "\u2028", "\ufeff",
           "\U0001f600", "x" * 100_000, " \t ", "\\u0000"]
LINES = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL)), max_size=6)
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_one_line_or_success(result):
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  if result.returncode != 0:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("jaxdp: error: "), \
        result.stderr[-2000:]


@SETTINGS
@given(lines=LINES, jsonl=st.booleans())
def test_prepare_any_text(tmp_path_factory, capfd, lines, jsonl):
  folder = tmp_path_factory.mktemp("prep")
  if jsonl:
    source = folder / "in.jsonl"
    # json.dumps escapes a lone surrogate as \\udXXX: valid JSON that decodes to no character.
    source.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
  else:
    source = folder / "in.txt"
    # "surrogatepass" writes a lone surrogate's 3 bytes: a file that is not UTF-8.
    source.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
  result = run(capfd, "prepare", str(source), "--out", str(folder / "out"), "--progress=false")
  assert_one_line_or_success(result)
  if result.returncode != 0:
    assert not os.path.exists(folder / "out" / "manifest.json")


@pytest.fixture(scope="module")
def loaded(tiny_run):
  """The tiny run's model, loaded once: the property is about the prompt, not the loading."""
  from jaxdp.lm import load_for_inference
  return load_for_inference(str(tiny_run[0]))


@SETTINGS
@given(prompt=st.one_of(st.text(max_size=60), st.sampled_from(SPECIAL),
                        st.builds("".join, LINES)))
def test_generate_any_prompt(tiny_run, loaded, monkeypatch, capfd, prompt):
  import jaxdp.lm
  monkeypatch.setattr(jaxdp.lm, "load_for_inference", lambda workdir, step=None: loaded)
  # --max_new_tokens 0: the prompt is parsed, encoded and echoed, nothing is compiled.
  result = run(capfd, "generate", "--workdir", str(tiny_run[0]), "--prompt", prompt,
               "--max_new_tokens", "0", "--cpu_devices", "8")
  assert_one_line_or_success(result)
  if result.returncode == 0:
    assert result.stdout.startswith(prompt)
