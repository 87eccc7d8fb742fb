"""Training batches from a folder of several .bin shards (read through tokenfiles.ConcatTokens, which
serves contiguous slices only) equal those from one file holding the same stream."""

import numpy as np

from jaxdp.data import tokenfiles
from jaxdp.data.pipeline import Dataset
from jaxdp.data.spec import DataSpec


def _tokenizer_json(path) -> str:
  from tokenizers import Tokenizer, models
  vocab = {f"w{i}": i for i in range(32)}
  Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path))
  return str(path)


def test_batches_of_sharded_bin_files_equal_those_of_one_file(tmp_path):
  tokenizer = _tokenizer_json(tmp_path / "tokenizer.json")
  stream = np.random.default_rng(0).integers(0, 32, 3000)
  (tmp_path / "shards").mkdir()
  tokenfiles.write_token_file(str(tmp_path / "shards" / "data_train_000000.bin"), stream[:1234])
  tokenfiles.write_token_file(str(tmp_path / "shards" / "data_train_000001.bin"), stream[1234:])
  tokenfiles.write_token_file(str(tmp_path / "one.bin"), stream)

  def batches(path):
    spec = DataSpec(path=path, tokenizer=tokenizer, seq_len=16, global_batch_size=8, grad_accum_steps=2)
    dataset = Dataset(spec)
    return [dataset.train(step) for step in range(3)]

  sharded, single = batches(str(tmp_path / "shards")), batches(str(tmp_path / "one.bin"))
  for got, want in zip(sharded, single):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert sharded[0]["inputs"].shape == (2, 4, 16)
