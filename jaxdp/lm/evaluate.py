"""Downstream evaluation of a built-in language model: multiple-choice tasks in HellaSwag's JSONL
format, and perplexity / bits per byte of any text, scored data-parallel over every device.

A task is `KIND:PATH`, several joined by commas (`jaxdp evaluate --task`, config.eval_tasks):

  hellaswag:FILE.jsonl  one item per line, {"ctx": str, "endings": [str, ...], "label": int}
                        (HellaSwag's own files; other fields are ignored). Each ending is scored
                        by the log-likelihood of its tokens after the context: "acc" picks the
                        ending with the highest sum, "acc_norm" the highest mean per token (the
                        length-normalised score llm.c and nanoGPT report for HellaSwag).
  text:FILE             the whole file as one document, or with a .jsonl name one document per
                        line's "text" field. Reports "loss" (nats per token), "perplexity"
                        (exp of it) and "bpb" (bits per UTF-8 byte: loss x tokens / (bytes x ln 2)).

Metrics are named NAME/METRIC, NAME being the file's name without its extension.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxdp.errors import JaxdpError
from jaxdp.runtime.hooks import Hook, LoopContext

KINDS = ("hellaswag", "text")
CHOICE_FIELDS = ("ctx", "endings", "label")


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task: its kind (one of KINDS), file, name (the metrics' prefix), and the
  setting it came from (--task, --text, config.eval_tasks), named in its errors."""
  kind: str
  path: str
  name: str
  field: str = "--task"

  @property
  def spec(self) -> str:
    """The task as written on the command line: KIND:PATH."""
    return f"{self.kind}:{self.path}"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One multiple-choice item: `context`, its candidate `endings`, the right one's index."""
  context: str
  endings: tuple[str, ...]
  label: int
  line: int  # 1-based line of the file, for messages.


@dataclasses.dataclass
class Prepared:
  """A task read and tokenised into rows of one model context (see `prepare`).

  rows: "inputs", "targets" int32 [n, seq_len], "weights" float32 [n, seq_len] (1 on the tokens
  scored). For hellaswag, `item` int [n] is each row's item and `labels` int [items] the right
  endings' rows' positions within their item; for text, `bytes` is the UTF-8 size of the text.
  """
  task: Task
  rows: dict[str, np.ndarray]
  item: np.ndarray | None = None
  labels: np.ndarray | None = None
  bytes: int = 0


def parse_tasks(spec: str, field: str = "--task") -> list[Task]:
  """`KIND:PATH[,KIND:PATH...]` -> Tasks (blank: none); `field` names the setting in messages.

  Raises:
    JaxdpError: an entry without a kind, an unknown kind, an empty path, or two tasks with the
      same name.
  """
  tasks: list[Task] = []
  for entry in (e.strip() for e in (spec or "").split(",")):
    if not entry:
      continue
    kind, sep, path = entry.partition(":")
    if not sep or kind not in KINDS:
      raise JaxdpError(f"{field}: {entry!r} is not KIND:FILE with KIND one of {', '.join(KINDS)}; "
                       f"e.g. hellaswag:hellaswag_val.jsonl or text:valid.txt")
    if not path:
      raise JaxdpError(f"{field}: {entry!r} names no file; give {kind}:FILE")
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or path
    same = [t for t in tasks if t.name == name]
    if same:
      raise JaxdpError(f"{field}: {same[0].spec!r} and {entry!r} would both report as {name!r} "
                       "(metrics are named after the file); rename one of the files")
    tasks.append(Task(kind, path, name, field))
  return tasks


def _read_text(task: Task) -> str:
  field = task.field
  try:
    with open(task.path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise JaxdpError(f"{field}: {task.path!r}: no such file; give the path of a "
                     f"{'HellaSwag-format .jsonl' if task.kind == 'hellaswag' else 'text'} "
                     "file") from None
  except IsADirectoryError:
    raise JaxdpError(f"{field}: {task.path!r} is a directory; give a file") from None
  except UnicodeDecodeError as e:
    raise JaxdpError(f"{field}: {task.path!r} is not UTF-8 text (byte {e.start}); give a text "
                     "file") from None
  except OSError as e:
    raise JaxdpError(f"{field}: cannot read {task.path!r} ({e.strerror})") from None


def _json_object(line: str, number: int, task: Task, expected: str) -> dict:
  field = task.field
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    raise JaxdpError(f"{field}: {task.path} line {number}: not valid JSON ({e.msg}, column "
                     f"{e.colno}); each line must be one object {expected}") from None
  if not isinstance(value, dict):
    raise JaxdpError(f"{field}: {task.path} line {number}: a JSON {type(value).__name__}, not an "
                     f"object {expected}")
  return value


def read_choices(task: Task) -> list[Choice]:
  """The items of a hellaswag task's file (blank lines skipped).

  Raises:
    JaxdpError: a missing or unreadable file, no items, or a line (named by number) that is not
      a JSON object with a string "ctx", a non-empty list of non-empty string "endings" and an
      integer "label" indexing them.
  """
  expected = '{"ctx": "...", "endings": ["...", ...], "label": 0}'
  field = task.field
  items = []
  # Split at newlines only: str.splitlines would also split at U+2028 inside a JSON string.
  for number, line in enumerate(_read_text(task).split("\n"), 1):
    if not line.strip():
      continue
    value = _json_object(line, number, task, expected)
    where = f"{field}: {task.path} line {number}"
    missing = [k for k in CHOICE_FIELDS if k not in value]
    if missing:
      raise JaxdpError(f"{where}: no {', '.join(repr(k) for k in missing)}; each line must be "
                       f"{expected}" + (" (the HellaSwag test split has no labels: use the "
                                        "validation split)" if missing == ["label"] else ""))
    context, endings, label = (value[k] for k in CHOICE_FIELDS)
    if not isinstance(context, str):
      raise JaxdpError(f"{where}: \"ctx\" is a {type(context).__name__}; give a string")
    if not isinstance(endings, list) or not endings:
      raise JaxdpError(f"{where}: \"endings\" must be a non-empty list of strings; got "
                       f"{json.dumps(endings)[:60]}")
    for k, ending in enumerate(endings):
      if not isinstance(ending, str) or not ending.strip():
        raise JaxdpError(f"{where}: endings[{k}] is {json.dumps(ending)[:60]}; every ending must "
                         "be non-empty text")
    if isinstance(label, bool) or not isinstance(label, int):
      raise JaxdpError(f"{where}: \"label\" is {json.dumps(label)[:60]}; give the right ending's "
                       f"index, an integer 0..{len(endings) - 1}")
    if not 0 <= label < len(endings):
      raise JaxdpError(f"{where}: \"label\" {label} is out of range for {len(endings)} endings; "
                       f"give 0..{len(endings) - 1}")
    items.append(Choice(context, tuple(endings), label, number))
  if not items:
    raise JaxdpError(f"{field}: {task.path} holds no items; give one JSON object per line, "
                     f"{expected}")
  return items


def read_documents(task: Task) -> list[str]:
  """The documents of a text task: the whole file, or each line's "text" of a .jsonl file.

  Raises:
    JaxdpError: a missing or unreadable file, a malformed .jsonl line (named by number), or no
      text at all.
  """
  field, text = task.field, _read_text(task)
  if not task.path.endswith(".jsonl"):
    documents = [text]
  else:
    documents = []
    for number, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      value = _json_object(line, number, task, '{"text": "..."}')
      if not isinstance(value.get("text"), str):
        raise JaxdpError(f"{field}: {task.path} line {number}: no string \"text\" field; each line "
                         'must be {"text": "..."}')
      documents.append(value["text"])
  documents = [d for d in documents if d]
  if not documents:
    raise JaxdpError(f"{field}: {task.path} holds no text; give a non-empty file")
  return documents


def _separated(context: str, ending: str) -> str:
  """The ending as it follows the context: after one space, as nanoGPT's and llm.c's HellaSwag
  scripts join them, unless either side already has the whitespace."""
  if not context or context[-1].isspace() or ending[0].isspace():
    return ending
  return " " + ending


def choice_rows(items: Sequence[Choice], tokenizer: Any, seq_len: int, *,
                task: Task | None = None) -> Prepared:
  """One row per (item, ending): the context's tokens then the ending's, the targets of the
  ending's tokens weighted 1. A context too long for `seq_len` loses its first tokens.

  An empty context starts from the tokenizer's end-of-text token, so that the ending's first
  token is scored too.

  Raises:
    JaxdpError: an ending longer than the model's context (its line named).
  """
  contexts = tokenizer.encode_batch([item.context for item in items])
  pieces = tokenizer.encode_batch([_separated(item.context, ending)
                                   for item in items for ending in item.endings])
  rows = _empty_rows(sum(len(item.endings) for item in items), seq_len)
  owner, labels, r = [], [], 0
  for i, (item, context) in enumerate(zip(items, contexts)):
    context = np.asarray(context, np.int32)
    if not len(context):
      context = np.asarray([tokenizer.end_of_text], np.int32)
    labels.append(item.label)
    for k in range(len(item.endings)):
      ending = np.asarray(pieces[r], np.int32)
      if len(ending) > seq_len:
        where = f"{task.field}: {task.path}" if task else "the task"
        raise JaxdpError(f"{where} line {item.line}: endings[{k}] is {len(ending)} "
                         f"tokens, longer than the model's context of {seq_len}; shorten it")
      tokens = np.concatenate([context, ending])[-(seq_len + 1):]
      n = len(tokens) - 1
      rows["inputs"][r, :n], rows["targets"][r, :n] = tokens[:-1], tokens[1:]
      rows["weights"][r, n - len(ending):n] = 1.0
      owner.append(i)
      r += 1
  return Prepared(task or Task("hellaswag", "", ""), rows, item=np.asarray(owner),
                  labels=np.asarray(labels))


def text_rows(documents: Sequence[str], tokenizer: Any, seq_len: int, *,
              task: Task | None = None) -> Prepared:
  """Each document after an end-of-text token, cut into windows of `seq_len` predicted tokens
  (the last one shorter, its padding weighted 0): every token of the text is scored exactly
  once, with the context of its own window (non-overlapping windows, as the validation loss)."""
  windows = []
  for ids in tokenizer.encode_batch(list(documents)):
    tokens = np.concatenate([[tokenizer.end_of_text], np.asarray(ids, np.int32)]).astype(np.int32)
    windows += [tokens[start:start + seq_len + 1] for start in range(0, len(tokens) - 1, seq_len)]
  rows = _empty_rows(len(windows), seq_len)
  for r, window in enumerate(windows):
    n = len(window) - 1
    rows["inputs"][r, :n], rows["targets"][r, :n] = window[:-1], window[1:]
    rows["weights"][r, :n] = 1.0
  size = sum(len(d.encode("utf-8")) for d in documents)
  return Prepared(task or Task("text", "", ""), rows, bytes=size)


def _empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  return {"inputs": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
          "weights": np.zeros((n, seq_len), np.float32)}


def prepare(tasks: Sequence[Task], tokenizer: Any, seq_len: int) -> list[Prepared]:
  """Each task read and tokenised into rows of `seq_len` tokens (once; scored any number of times).

  Raises:
    JaxdpError: a file that cannot be read or holds a malformed item (see read_choices and
      read_documents).
  """
  out = []
  for task in tasks:
    if task.kind == "hellaswag":
      out.append(choice_rows(read_choices(task), tokenizer, seq_len, task=task))
    else:
      out.append(text_rows(read_documents(task), tokenizer, seq_len, task=task))
  return out


def choice_accuracy(prepared: Prepared, loss_sum: np.ndarray, count: np.ndarray) -> dict[str, float]:
  """{"acc", "acc_norm", "items"} from each row's summed token loss (nats) and token count.

  acc: the ending with the highest total log-likelihood is the label's; acc_norm: the highest
  mean log-likelihood per token. The first ending wins a tie, as numpy's argmax.
  """
  assert prepared.item is not None and prepared.labels is not None
  total = -loss_sum
  mean = total / np.maximum(count, 1)
  correct = correct_norm = 0
  starts = np.searchsorted(prepared.item, np.arange(len(prepared.labels) + 1))
  for i, label in enumerate(prepared.labels):
    rows = slice(starts[i], starts[i + 1])
    correct += int(np.argmax(total[rows]) == label)
    correct_norm += int(np.argmax(mean[rows]) == label)
  items = len(prepared.labels)
  return {"acc": correct / items, "acc_norm": correct_norm / items, "items": items}


def text_metrics(prepared: Prepared, loss_sum: np.ndarray, count: np.ndarray) -> dict[str, float]:
  """{"loss" (nats/token), "perplexity", "bpb" (bits per UTF-8 byte), "tokens", "bytes"}."""
  nats, tokens = float(np.sum(loss_sum)), float(np.sum(count))
  loss = nats / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bpb": nats / (prepared.bytes * math.log(2)), "tokens": int(tokens),
          "bytes": prepared.bytes}


def score(dp: Any, params: Any, prepared: Sequence[Prepared], batch_size: int) -> dict[str, float]:
  """Every prepared task scored with `dp.loss_fn` on `dp.mesh`: {"NAME/METRIC": value}.

  params: placed on dp.mesh (a train state's params, or jaxdp.parallel.scoring.replicate's).
  batch_size: rows per global batch, a multiple of the data devices.
  """
  from jaxdp.parallel.scoring import row_losses
  metrics: dict[str, float] = {}
  for task in prepared:
    totals = row_losses(dp, params, task.rows, batch_size=batch_size)
    values = (choice_accuracy if task.task.kind == "hellaswag" else text_metrics)(
        task, totals["loss_sum"], totals["count"])
    metrics.update({f"{task.task.name}/{k}": v for k, v in values.items()})
  return metrics


def round_up(rows: int, devices: int) -> int:
  """The smallest multiple of `devices` that is >= rows (and >= devices)."""
  return max(1, -(-rows // devices)) * devices


def summary(tasks: Sequence[Task], metrics: dict[str, float]) -> list[str]:
  """One line per task, for a terminal."""
  lines = []
  for t in tasks:
    m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.split("/", 1)[0] == t.name}
    if t.kind == "hellaswag":
      lines.append(f"{t.name}: acc {m['acc']:.4f}, acc_norm {m['acc_norm']:.4f} "
                   f"({m['items']} items)")
    else:
      lines.append(f"{t.name}: loss {m['loss']:.4f} nats/token, perplexity {m['perplexity']:.3f}, "
                   f"{m['bpb']:.4f} bits per byte ({m['tokens']:,} tokens, {m['bytes']:,} bytes)")
  return lines


def is_evaluation_step(step: int, eval_every: int, num_steps: int) -> bool:
  """The loop's evaluation points: every `eval_every` steps (0: never) and the last step."""
  return bool(eval_every and step % eval_every == 0) or step == num_steps


class EvalTasks(Hook):
  """A `jaxdp.Hook` scoring tasks on the training state's parameters at each of the loop's
  evaluation points (config.eval_tasks), after the validation loss: one line
  {"step", "NAME/METRIC": ...} in metrics.jsonl (and TensorBoard, the sinks) and one printed
  line per task.

  Args:
    prepared: the tasks, read and tokenised once (`prepare`).
    batch_size: rows per global batch, a multiple of the data devices.
  """

  def __init__(self, prepared: Sequence[Prepared], batch_size: int):
    self.prepared, self.batch_size = list(prepared), batch_size

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """At an evaluation step: scores every task, writes their metrics and one summary line each."""
    options = ctx.options
    if not self.prepared or not is_evaluation_step(step, options.eval_every, options.num_steps):
      return
    metrics = score(ctx.dp, ctx.state.params, self.prepared, self.batch_size)
    ctx.write({"step": step, **metrics})
    for line in summary([p.task for p in self.prepared], metrics):
      ctx.say(f"step {step}: {line}")

  def __repr__(self) -> str:
    return f"EvalTasks({', '.join(p.task.spec for p in self.prepared)})"


def loop_hooks(config: Any, tokenizer: Any, seq_len: int, batch_size: int) -> list[Hook]:
  """The hooks of config.eval_tasks for a training run: [EvalTasks] (its files read, checked and
  tokenised now, before the first step), or [] when it is blank.

  Raises:
    JaxdpError: a malformed config.eval_tasks, or a task file that is missing or malformed.
  """
  tasks = parse_tasks(config.get("eval_tasks", ""), "config.eval_tasks")
  return [EvalTasks(prepare(tasks, tokenizer, seq_len), batch_size)] if tasks else []
