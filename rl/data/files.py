"""Task rows from dataset files: JSON lines, JSON, parquet, or a folder written by `datasets`' save_to_disk.

Three column layouts load as they are:

- this project's rows: {"prompt", "answer", "task"?, "solution"?, "mode"?, ...} (rl/data/tasks.py);
- TRL's: `prompt` a string or a chat message list; every other column reaches the reward functions as a
  keyword column (rewards/worker.py: columns_of);
- verl's RL parquet: `data_source` (the row's task, unless there is a `task` column), `prompt` (chat
  messages), `reward_model: {ground_truth, style}` (the answer, unless there is an `answer` column),
  `extra_info` (a dict, passed on to the rewards), `ability`.

`prompt_key`/`answer_key` name other columns; a dotted answer key (`reward_model.ground_truth`) reaches
into a struct column. With `format`, a function from rl.data.benchmarks.FORMATS turns each record into a
row instead. Values arrive as plain Python (pyarrow's to_pylist), never numpy or arrow scalars, since
reward plugins get them as they are. A bad file or row is one ValueError naming the file, the row (and
the line of a JSON lines file) and the column.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rl.data.benchmarks import FORMATS
from rl.data.tasks import validate_rows

FORMS = (".jsonl, .json (a list of objects, or JSON lines), .parquet, .csv (d1's Sudoku files), or a folder "
         "written by datasets' save_to_disk")
# The split of a DatasetDict folder each task file takes, in order of preference.
SPLITS = {"train": ("train",), "val": ("validation", "test")}


def load_file(path: str | Path, split: str = "train", *, prompt_key: str = "prompt", answer_key: str = "answer",
              format: str | None = None) -> list[dict]:
    """The checked task rows of a dataset file (`split` picks a DatasetDict folder's split)."""
    path = Path(path).expanduser()
    records, lines = read_records(path, split)
    source = str(path)

    def where(i: int) -> str:
        return f"{source}:{lines[i]}: row {i}" if lines else f"{source}: row {i}"

    default_task = path.parent.name if (path.parent / "dataset_dict.json").is_file() else path.stem
    if format is None:
        columns = {k for r in records if isinstance(r, dict) for k in r}
        answer_key = _answer_path(columns, answer_key)
        _check_columns(columns, bool(records), source,
                       (("task.prompt_key", prompt_key), ("task.answer_key", answer_key)))
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{where(i)} is {type(record).__name__}, expected an object with the prompt and answer")
        if format is None:
            row = _to_row(record, prompt_key, answer_key, where(i))
        else:
            try:
                row = FORMATS[format](record)
            except ValueError as e:
                raise ValueError(f"{where(i)}: task.format {format!r}: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where(i)}: task.format {format!r} gave {type(row).__name__}, expected a dict")
        if row.get("task") is None:
            row["task"] = record.get("data_source") or default_task
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            row["answer"] = str(answer)
        _drop_empty_images(row, where(i))
        rows.append(row)
    return validate_rows(rows, source, lines)


def read_records(path: Path, split: str = "train") -> tuple[list, list[int] | None]:
    """The records of a file as read (plain Python), and each one's line for a JSON lines file."""
    if not path.exists():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    if path.is_dir():
        return _read_saved(path, split), None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(path, _text(path))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path), None
    if suffix == ".csv":
        return _read_csv(path)
    raise ValueError(f"{path}: unknown kind of task file {suffix or '(no extension)'!r}; expected {FORMS}")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_json_lines(path: Path, text: str) -> tuple[list, list[int]]:
    records, lines = [], []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other characters splitlines breaks at.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        lines.append(lineno)
    return records, lines


def _read_json(path: Path) -> tuple[list, list[int] | None]:
    text = _text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return _read_json_lines(path, text)  # JSON lines in a .json file, as `datasets` writes them
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and text.strip().count("\n") == 0:
        return [data], [1]  # JSON lines with a single row
    raise ValueError(f"{path}: a JSON {type(data).__name__}"
                     f"{f' with keys {sorted(data)[:8]}' if isinstance(data, dict) else ''}; expected a list of "
                     "row objects, or JSON lines")


def _read_csv(path: Path) -> tuple[list, list[int]]:
    # Every cell stays a string: a Sudoku grid such as "0012..." is text, and a reader that infers
    # numbers would drop its leading zeros. Line numbers are the file's (row 1 is the header).
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: an empty CSV file (expected a header row)")
    records, lines = [], []
    for cells in reader:
        if not cells:
            continue
        if len(cells) != len(header):
            raise ValueError(f"{path}:{reader.line_num}: {len(cells)} columns where the header has {len(header)}")
        records.append(dict(zip(header, cells)))
        lines.append(reader.line_num)
    return records, lines


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read it as parquet ({str(e).splitlines()[0]})") from None
    return table.to_pylist()


def _read_saved(path: Path, split: str) -> list[dict]:
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ValueError(f"{path}: a folder without the state.json or dataset_dict.json that datasets' "
                         f"save_to_disk writes; expected {FORMS}")
    import pyarrow as pa
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot load it with datasets.load_from_disk ({str(e).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        name = next((s for s in SPLITS[split] if s in ds), None)
        if name is None:
            wanted = " or ".join(repr(s) for s in SPLITS[split])
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}; task.{split}_file takes its {wanted} "
                             f"split (or name a split's folder, e.g. {path / sorted(ds)[0]})")
        ds = ds[name]
    # The arrow format: raw values, so an image column stays its stored {bytes, path}, not a decoded PIL image.
    return ds.with_format("arrow")[:].to_pylist()


def _answer_path(columns: set, answer_key: str) -> str:
    """verl's layout keeps the answer in reward_model.ground_truth: the default key falls back to it."""
    if answer_key == "answer" and "answer" not in columns and "reward_model" in columns:
        return "reward_model.ground_truth"
    return answer_key


def _check_columns(columns: set, any_rows: bool, source: str, keys) -> None:
    # A key that is no column at all is a config mistake, named once for the file, not as "row 0 has no ...".
    for setting, key in keys:
        if any_rows and key.split(".")[0] not in columns:
            raise ValueError(f"{source}: no column {key.split('.')[0]!r} ({setting}={key!r}); its columns are "
                             f"{sorted(columns)}")


def _to_row(record: dict, prompt_key: str, answer_key: str, where: str) -> dict:
    row = dict(record)
    prompt = row.pop(prompt_key, None)
    if prompt is None:
        raise ValueError(f"{where} has no {prompt_key!r} (expected a non-empty string or a chat message list)")
    row["prompt"] = prompt
    # Copied, not moved: a reward may also read the answer's own column (ground_truth, reward_model, ...).
    answer = _answer(record, answer_key, where)
    if isinstance(answer, (dict, list)):
        # A structured ground truth (verl's Countdown: {"target": 98, "numbers": [44, 19, 35]}) reaches a
        # verl-style reward unchanged as `ground_truth`; `answer` is its JSON text, for logs and generations.
        row.setdefault("ground_truth", answer)
        answer = json.dumps(answer, ensure_ascii=False, sort_keys=True)
    row["answer"] = answer
    return row


def _answer(record: dict, key: str, where: str):
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise ValueError(f"{where} has no {key!r} (expected a non-empty string or a number)")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (str, int, float, dict, list)) or value in ({}, []):
        raise ValueError(f"{where} column {key!r} is {type(value).__name__} {_short(value)}, expected a string, "
                         "a number or a non-empty structure (a verl ground truth such as {target, numbers})")
    return value


def _drop_empty_images(row: dict, where: str) -> None:
    # verl's multimodal parquet keeps a row's prompt images in `images` (a list); text rows have none.
    # rl.data.loader reads them for a model that takes images (LLaDA-V) and refuses them otherwise.
    images = row.get("images")
    if images is None or images == [] or images == "":
        row.pop("images", None)
    elif not isinstance(images, list):
        raise ValueError(f"{where} column 'images': expected a list of images, got {type(images).__name__}")


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
