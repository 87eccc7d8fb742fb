"""Every numeric config field has a valid range, checked before any work; a field that can have
no effect in the config it is set in is warned about, not silently ignored."""

import pytest

from jaxdp.errors import JaxdpError
from jaxdp.lm.config import field_names, ignored_fields, load_preset, validate


def numeric_fields():
  config = load_preset("default")
  for name in field_names(config):
    node = config
    for part in name.split(".")[:-1]:
      node = node[part]
    value = node[name.split(".")[-1]]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      yield name


def with_value(name, value):
  config = load_preset("default")
  node = config
  for part in name.split(".")[:-1]:
    node = node[part]
  node[name.split(".")[-1]] = type(node[name.split(".")[-1]])(value)
  return config


@pytest.mark.parametrize("name", sorted(numeric_fields()))
def test_every_numeric_field_refuses_a_nonsense_value_by_name(name):
  with pytest.raises(JaxdpError) as error:
    validate(with_value(name, -7), 8, "cpu")
  assert f"config.{name}=" in str(error.value) or name.split(".")[-1] in str(error.value)


def test_the_default_preset_has_no_ignored_fields():
  assert ignored_fields(load_preset("default")) == []


@pytest.mark.parametrize("name,value,needs", [
    ("loss_scale_init", 1024.0, "precision='fp16'"),
    ("compression_ratio", 0.5, "compression='topk' or 'randomk'"),
    ("sync_every", 8, "sync='local_sgd'"),
    ("outer_lr", 0.5, "diloco=True"),
    ("max_consecutive_skips", 3, "nan_policy='skip'"),
])
def test_a_field_without_effect_is_named_with_what_it_needs(name, value, needs):
  warnings = ignored_fields(with_value(name, value))
  assert len(warnings) == 1 and f"config.{name}=" in warnings[0] and needs in warnings[0]


def test_a_field_with_its_condition_met_is_not_warned():
  config = with_value("compression_ratio", 0.5)
  config.compression = "topk"
  assert ignored_fields(config) == []


def test_train_and_prepare_agree_on_what_a_corpus_is(tmp_path):
  """A latin-1 file is refused by both, with the same fix."""
  from jaxdp.data import load_tokens
  from jaxdp.data.prepare import prepare
  path = tmp_path / "latin1.txt"
  path.write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 50)
  with pytest.raises(JaxdpError, match="is not valid UTF-8.*iconv"):
    load_tokens(str(path))
  with pytest.raises(JaxdpError, match="is not valid UTF-8.*iconv"):
    prepare([str(path)], str(tmp_path / "out"), progress=False)


def test_prepare_names_the_files_it_skips(tmp_path, capsys):
  from jaxdp.data.prepare import prepare
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.txt").write_text("some text to train on\n" * 20)
  (tmp_path / "in" / "b.csv").write_text("x,y\n1,2\n")
  prepare([str(tmp_path / "in")], str(tmp_path / "out"), progress=False)
  err = capsys.readouterr().err
  assert "skipped 1 file(s)" in err and "b.csv" in err
