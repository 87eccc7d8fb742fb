"""The configuration reference is generated from the config comments and committed up to date."""

import importlib.util
import os

import pytest

from jaxdp.lm.config import field_names, load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gen():
  spec = importlib.util.spec_from_file_location("gen_config_docs",
                                                os.path.join(ROOT, "tools", "gen_config_docs.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_configuration_reference_is_up_to_date(gen):
  with open(gen.SOURCE) as f:
    expected = gen.render(f.read())
  with open(gen.TARGET) as f:
    assert f.read() == expected, "docs/configuration.md is stale: run python tools/gen_config_docs.py"


def test_every_default_field_is_documented_with_its_comment(gen):
  with open(gen.SOURCE) as f:
    documented = {f["name"]: f for f in gen.parse_fields(f.read()) if not f.get("section")}
  assert set(documented) == set(field_names(load_preset("default")))
  assert all(f["doc"] for f in documented.values())


def test_a_field_without_a_comment_is_rejected(gen):
  with pytest.raises(SystemExit, match="field 'extra' has no comment"):
    gen.parse_fields("c = ConfigDict()\nc.seed = 0  # Seed.\nc.extra = 1\n")
