"""The row formats people fine-tune on, read and written back as they came.

JSON Lines / JSON rows are recognised by their fields (:func:`row_format`):

* ``alpaca``: ``instruction``, optional ``input``, ``output`` (Stanford Alpaca; ``alpaca_data.json`` is a JSON
  array, many copies are JSON Lines);
* ``dolly``: ``instruction``, optional ``context``, ``response``, optional ``category`` (databricks-dolly-15k);
* ``chat``: ``messages`` = [{role, content}, ...] ending with the assistant turn (OpenAI / HF chat format);
* ``ours``: ``prompt`` / ``response`` (optional ``system``, ``id``, ``category``, ``split``; see data/README.md).

:func:`instruction_row` turns an Alpaca / Dolly row into ours (prompt = the instruction, then a blank line and
the input / context when there is one); :mod:`analysis.llm.parsers` calls it, so every loader reads both.
:func:`source_rows` gives the original JSON objects of a loaded dataset, one per example, so that a subset
is written back (:func:`jsonl_bytes`) in the input's own format and re-loads to the same conversations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.llm.examples import DataError, Dataset, Where, check_text

__all__ = ["FORMATS", "instruction_row", "jsonl_bytes", "row_format", "source_rows"]

#: format -> (instruction-like field, extra-text field, response field); ``chat`` and ``ours`` need no mapping
INSTRUCTION_FORMATS = {"alpaca": ("instruction", "input", "output"), "dolly": ("instruction", "context", "response")}
FORMATS = ("alpaca", "dolly", "chat", "ours")


def row_format(row: Mapping[str, Any]) -> str:
    """Which of :data:`FORMATS` a row is written in (by its fields); ``ours`` for anything else."""
    if "messages" in row:
        return "chat"
    if "instruction" in row and "prompt" not in row and "goal" not in row:
        return "alpaca" if "output" in row or "input" in row else "dolly"
    return "ours"


def instruction_row(row: Mapping[str, Any], at: Where, require_response: bool = True) -> dict[str, Any]:
    """An Alpaca / Dolly row as ours (``prompt``, ``response``, plus the row's other fields); other rows as
    they are. Errors name the row's own fields (``instruction``, ``input``, ``output`` / ``context``,
    ``response``); a missing or empty response is an error unless ``require_response`` is False."""
    kind = row_format(row)
    if kind not in INSTRUCTION_FORMATS:
        return dict(row)
    instruction_key, extra_key, response_key = INSTRUCTION_FORMATS[kind]
    instruction = check_text(row[instruction_key], instruction_key, at)
    if not instruction.strip():
        raise at.error("is empty", instruction_key, f"every {kind} row needs a non-empty instruction")
    extra = row.get(extra_key)
    extra = "" if extra is None else check_text(extra, extra_key, at)
    response = row.get(response_key)
    if require_response and (response is None or (isinstance(response, str) and not response.strip())):
        raise at.error("is missing" if response is None else "is empty", response_key,
                       f"every {kind} row needs a non-empty '{response_key}' (the answer that carries the loss)")
    out = {key: value for key, value in row.items() if key not in (instruction_key, extra_key, response_key)}
    out["prompt"] = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if response is not None:
        out["response"] = check_text(response, response_key, at)
    return out


def source_rows(dataset: Dataset) -> list[dict] | None:
    """The original JSON object of every example of ``dataset`` (in its order), read again from its source
    file; None when the source is not a JSON / JSON Lines file or has changed since (content hash).

    Examples are matched by id: the row's own ``id``, else the position id ``<stem>-NNNN`` the parser gave
    (:mod:`analysis.llm.parsers`), so subsets made with ``split`` / ``take`` are matched too."""
    path = Path(dataset.source) if dataset.source else None
    if path is None or not path.is_file() or path.suffix.lower() not in (".jsonl", ".ndjson", ".json"):
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != dataset.content_hash:
        return None
    from analysis.llm.parsers import _stem

    text = data.decode("utf-8-sig")
    stem = _stem(str(path))
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(text)
            rows = rows["data"] if isinstance(rows, dict) else rows
        else:
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]
    except ValueError:
        return None
    by_id = {}
    for i, row in enumerate(rows, start=1):
        if isinstance(row, Mapping):
            ident = row.get("id")
            by_id[str(ident).strip() if ident is not None and str(ident).strip() else f"{stem}-{i:04d}"] = row
    found = [by_id.get(ex.id) for ex in dataset]
    return None if any(row is None for row in found) else [dict(row) for row in found]


def jsonl_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """JSON Lines (UTF-8, LF, one object per line, non-ASCII kept) of ``rows``."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def check_instruction_clash(row: Mapping[str, Any], at: Where) -> None:
    """A row may use one format only: ``instruction`` together with ``prompt`` or ``messages`` is refused."""
    if "instruction" in row and ("prompt" in row or "messages" in row):
        other = "prompt" if "prompt" in row else "messages"
        raise DataError(f"has both 'instruction' and '{other}'", file=at.file, line=at.line, field="instruction",
                        fix="use one format per row: Alpaca/Dolly (instruction ...), ours (prompt/response) or "
                            "chat (messages)", where=at.where)
