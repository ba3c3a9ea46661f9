"""Parsers for user data: bytes of a JSONL / JSON / CSV / AdvBench / HEx-PHI file in, :class:`Dataset` out.

Every problem raises :class:`DataError` naming the file, the 1-based line (or JSON item) and the field.
The loaders in :mod:`analysis.llm.data` read files and call these."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.llm.examples import DataError, Dataset, Example, Where, check_text, freeze_messages
from analysis.llm.formats import check_instruction_clash, instruction_row

__all__ = [
    "BENCHMARKS", "HEXPHI_CATEGORIES", "HEXPHI_FILE", "KINDS", "detect_csv_kind", "detect_kind", "parse_benchmark", "parse_bytes",
    "parse_csv", "parse_hexphi", "parse_json", "parse_jsonl", "parse_text",
]

#: The 11 HEx-PHI categories in HEx-PHI's own order (``category_1.csv`` .. ``category_11.csv``).
HEXPHI_CATEGORIES: tuple[str, ...] = (
    "illegal_activity",
    "child_abuse",
    "hate_harass_violence",
    "malware",
    "physical_harm",
    "economic_harm",
    "fraud_deception",
    "adult_content",
    "political_campaigning",
    "privacy_violation",
    "tailored_financial_advice",
)

#: Values accepted for ``kind=`` by :func:`load_any` and :func:`load_bytes`.
#: A JSON Lines file with bad lines reports this many of them (with line numbers) in one error.
MAX_REPORTED_LINES = 5
KINDS = ("jsonl", "json", "csv", "advbench", "hexphi", "harmbench", "jailbreakbench", "strongreject", "xstest", "text")

#: What to do with a file of prompts without answers, in the user's terms (not the loader's API).
PROMPT_ONLY_FIX = ("Add a 'response' to every row to collect gradients or fine-tune on it; a file of prompts alone "
                   "(no answers) can be used as the harmful or benign prompts of a safety evaluation instead")
_FIX_ROW = ("expected a JSON object with 'prompt' and 'response' or 'messages' (or Alpaca / Dolly 'instruction' "
            "with 'output' / 'response')")
_FIX_CSV = "expected a header row with 'prompt' and 'response' columns (or AdvBench 'goal' and 'target')"
HEXPHI_FILE = re.compile(r"^category_(\d+)\.csv$", re.IGNORECASE)
_OPTIONAL_TEXT = ("id", "category", "split", "system")


# --------------------------------------------------------------------------------------
# rows -> examples


def _optional_text(row: Mapping[str, Any], key: str, at: Where) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # integer ids are common; keep them as text
    value = check_text(value, key, at)
    if key != "system":
        value = value.strip()
        if not value:
            if key == "id":
                raise at.error("must not be empty", "id", "give the row a non-empty id or drop the field")
            return None
    return value


def _row_to_example(
    row: Any, at: Where, default_id: str, require_response: bool, aliases: bool = True
) -> Example:
    if not isinstance(row, Mapping):
        raise at.error(f"got a JSON {_json_type(row)}", None, _FIX_ROW)
    if aliases and "instruction" in row:  # Alpaca / Dolly rows (analysis.llm.formats)
        check_instruction_clash(row, at)
        row = instruction_row(row, at, require_response)
    keys = set(row)
    if aliases:
        if "prompt" not in keys and "goal" in keys:
            row = {**row, "prompt": row["goal"]}
        if "response" not in keys and "target" in keys:
            row = {**row, "response": row["target"]}
        keys = set(row)
    meta = {k: _optional_text(row, k, at) for k in _OPTIONAL_TEXT}
    ex_id = meta["id"] or default_id

    if "messages" in keys:
        clash = sorted(keys & {"prompt", "response", "system"})
        if clash:
            raise at.error(
                f"has both 'messages' and {clash}", "messages", "use either 'messages' or 'prompt'/'response', not both"
            )
        messages = freeze_messages(row["messages"], at)
    else:
        if "prompt" not in keys:
            raise at.error("is missing", "prompt", _FIX_ROW)
        prompt = check_text(row["prompt"], "prompt", at)
        if not prompt.strip():
            raise at.error("is empty", "prompt", "every row needs a non-empty prompt")
        if "response" not in keys or row["response"] is None:
            if require_response:
                raise at.error(
                    "is missing", "response", _FIX_ROW + ". " + PROMPT_ONLY_FIX
                )
            response = ""
        else:
            response = check_text(row["response"], "response", at)
        messages = []
        if meta["system"] is not None:
            messages.append({"role": "system", "content": meta["system"]})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    if require_response and not messages[-1]["content"].strip():
        field_name = "messages" if "messages" in keys else "response"
        raise at.error(
            "is empty", field_name, "every row needs a non-empty response (the text the gradient is taken of). " + PROMPT_ONLY_FIX
        )
    try:
        return Example(messages=tuple(messages), id=ex_id, category=meta["category"], split=meta["split"])
    except DataError as e:  # re-attach the location
        raise at.error(e.problem, e.field, e.fix) from None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _build(
    name: str, source: str, data: bytes, items: Sequence[tuple[Example, Where]], empty_fix: str
) -> Dataset:
    if not items:
        raise DataError("contains no rows", file=source, fix=empty_fix)
    first: dict[str, Where] = {}
    for ex, at in items:
        if ex.id in first:
            raise at.error(
                f"duplicate id {ex.id!r}, already used at {first[ex.id].describe()}", "id", "give every row a unique id"
            )
        first[ex.id] = at
    with_response = [at for ex, at in items if ex.has_response]
    if with_response and len(with_response) < len(items):
        at = next(at for ex, at in items if not ex.has_response)
        raise at.error(
            f"has no response, but {with_response[0].describe()} has one",
            "response",
            "give every row a response, or none for a prompt-only dataset",
        )
    return Dataset(
        name=name,
        examples=[ex for ex, _ in items],
        source=source,
        content_hash=hashlib.sha256(data).hexdigest(),
    )


# --------------------------------------------------------------------------------------
# parsers (bytes in, Dataset out)


def _decode(data: bytes, file: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"is not valid UTF-8 (byte {e.start})", file=file, line=line, fix="save the file as UTF-8"
        ) from None
    return text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) with CRLF/LF endings removed; only '\\n' splits lines."""
    for n, line in enumerate(text.split("\n"), start=1):
        yield n, line[:-1] if line.endswith("\r") else line


def _stem(file: str) -> str:
    name = Path(file).name
    for ext in (".jsonl", ".json", ".csv", ".tsv", ".txt"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or name
    return name or "data"


def _combine(errors: list[DataError], total: int, file: str) -> DataError:
    """One DataError for ``total`` bad lines of which ``errors`` are the first :data:`MAX_REPORTED_LINES`:
    their line numbers (also in ``.lines``) and problems, and how many more there are. The same problem on
    every line is said once."""
    if total == 1:
        return errors[0]
    more = f" and {total - len(errors)} more" if total > len(errors) else ""
    fixes = list(dict.fromkeys(e.fix for e in errors if e.fix))
    fixes = [f for f in fixes if not any(f != g and f in g for g in fixes)]  # drop a fix another one repeats
    if len({(e.problem, e.field) for e in errors}) == 1:
        first = errors[0]
        numbers = ", ".join(str(e.line) for e in errors) + more
        error = DataError(first.problem, file=file, line=numbers, field=first.field,  # type: ignore[arg-type]
                          fix="; ".join(fixes) or None, where="lines")
    else:
        def one(e: DataError) -> str:
            return f"line {e.line}" + (f", field '{e.field}'" if e.field else "") + f": {e.problem}"

        error = DataError(f"{total} bad lines \u2014 " + "; ".join(one(e) for e in errors) + (f";{more}" if more else ""),
                          file=file, fix="; ".join(fixes) or None)
    error.line, error.lines = errors[0].line, [e.line for e in errors]
    return error


def parse_jsonl(data: bytes, file: str, require_response: bool) -> Dataset:
    text = _decode(data, file)
    stem = _stem(file)
    items: list[tuple[Example, Where]] = []
    errors: list[DataError] = []
    bad = 0
    for n, line in _lines(text):
        if not line.strip():
            continue
        at = Where(file, n)
        try:
            try:
                row = json.loads(line)
            except RecursionError:
                raise at.error("JSON is nested too deeply", None, _FIX_ROW) from None
            except json.JSONDecodeError as e:
                raise at.error(f"malformed JSON ({e.msg} at column {e.colno})", None, _FIX_ROW + ", one per line") from None
            except ValueError as e:  # e.g. integers longer than Python's digit limit
                raise at.error(f"malformed JSON ({e})", None, _FIX_ROW + ", one per line") from None
            items.append((_row_to_example(row, at, f"{stem}-{len(items) + bad + 1:04d}", require_response), at))
        except DataError as e:  # keep going: report the first few bad lines at once
            bad += 1
            if len(errors) < MAX_REPORTED_LINES:
                errors.append(e)
    if errors:
        raise _combine(errors, bad, file)
    return _build(stem, file, data, items, _FIX_ROW + ", one per line")


def parse_json(data: bytes, file: str, require_response: bool) -> Dataset:
    text = _decode(data, file)
    stem = _stem(file)
    if not text.strip():
        raise DataError("is empty", file=file, fix="expected a JSON array of objects with 'prompt' and 'response' or 'messages'")
    try:
        rows = json.loads(text)
    except RecursionError:
        raise DataError("JSON is nested too deeply", file=file) from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg})", file=file, line=e.lineno, fix="expected a JSON array of rows") from None
    except ValueError as e:
        raise DataError(f"malformed JSON ({e})", file=file, fix="expected a JSON array of rows") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise DataError(
            f"top level is a JSON {_json_type(rows)}",
            file=file,
            fix="expected a JSON array of objects with 'prompt' and 'response' or 'messages' (or use .jsonl)",
        )
    items = []
    for i, row in enumerate(rows, start=1):
        at = Where(file, i, where="item")
        items.append((_row_to_example(row, at, f"{stem}-{i:04d}", require_response), at))
    return _build(stem, file, data, items, "expected a non-empty JSON array of rows")


def _csv_rows(text: str, file: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based starting line, fields) for each non-blank CSV record."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=False)
    prev = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"malformed CSV ({e})", file=file, line=reader.line_num or prev + 1, fix=_FIX_CSV) from None
        start, prev = prev + 1, reader.line_num
        if not record or all(not f.strip() for f in record):
            continue
        yield start, record


def parse_csv(data: bytes, file: str, require_response: bool, advbench: bool = False) -> Dataset:
    text = _decode(data, file)
    stem = _stem(file)
    rows = _csv_rows(text, file)
    fix = "expected a header row with AdvBench 'goal' and 'target' columns" if advbench else _FIX_CSV
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise DataError("is empty", file=file, fix=fix) from None
    names = [h.strip().lower() for h in header]
    for i, h in enumerate(names):
        if h and h in names[:i]:
            raise DataError(f"column {h!r} appears twice in the header", file=file, line=header_line, field=h, fix=fix)
    if advbench:
        need = {"goal": "prompt", "target": "response"}
    elif "prompt" in names:
        need = {"prompt": "prompt", "response": "response"}
    elif "goal" in names:
        need = {"goal": "prompt", "target": "response"}
    else:
        need = {"prompt": "prompt", "response": "response"}
    required = list(need) if require_response else [k for k, v in need.items() if v == "prompt"]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"missing column(s) {missing} in the header (found {[h for h in names if h]})",
            file=file,
            line=header_line,
            field=missing[0],
            fix=fix,
        )
    index = {h: i for i, h in enumerate(names) if h}
    items: list[tuple[Example, Where]] = []
    for line, record in rows:
        at = Where(file, line)
        if len(record) > len(names) and any(f.strip() for f in record[len(names):]):
            raise at.error(
                f"has {len(record)} fields but the header has {len(names)}",
                None,
                "quote fields that contain commas with double quotes",
            )
        row: dict[str, Any] = {}
        for col, key in need.items():
            if col in index and index[col] < len(record):
                row[key] = record[index[col]]
        for key in _OPTIONAL_TEXT:
            if key in index and index[key] < len(record):
                row[key] = record[index[key]] or None
        if "prompt" not in row:
            raise at.error("is missing (row too short)", "prompt" if not advbench else "goal", fix)
        if row.get("response") == "" and not require_response:
            row["response"] = None
        if require_response and "response" not in row:
            raise at.error("is missing (row too short)", "response" if "prompt" in need else "target", fix)
        try:
            ex = _row_to_example(row, at, f"{stem}-{len(items) + 1:04d}", require_response, aliases=False)
        except DataError as e:  # report the CSV column name, not our internal one
            if e.field in ("prompt", "response") and need.get(e.field) is None:
                col = next(c for c, k in need.items() if k == e.field)
                raise at.error(e.problem, col, e.fix) from None
            raise
        items.append((ex, at))
    return _build(stem, file, data, items, "the header is there but no data rows follow")


def _hexphi_category(file: str) -> str:
    m = HEXPHI_FILE.match(Path(file).name)
    if not m or not 1 <= int(m.group(1)) <= len(HEXPHI_CATEGORIES):
        raise DataError(
            "is not a HEx-PHI file name",
            file=file,
            fix="HEx-PHI files are named category_1.csv .. category_11.csv; rename it or load it with load_csv",
        )
    return HEXPHI_CATEGORIES[int(m.group(1)) - 1]


def parse_hexphi(data: bytes, file: str) -> Dataset:
    category = _hexphi_category(file)
    text = _decode(data, file)
    items: list[tuple[Example, Where]] = []
    for line, record in _csv_rows(text, file):
        at = Where(file, line)
        # one prompt per row; an unquoted comma splits a prompt into several fields - rejoin them
        prompt = ",".join(record).strip()
        ex = _row_to_example(
            {"prompt": prompt, "category": category}, at, f"hexphi-{category}-{len(items) + 1:03d}", False
        )
        items.append((ex, at))
    return _build(f"hexphi-{category}", file, data, items, "expected one harmful prompt per line")

# --------------------------------------------------------------------------------------
# benchmark CSVs (prompt sets for evaluation) and plain text


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """Columns of a benchmark CSV, spelled as the benchmark does (matched case-insensitively). ``prompt`` is
    required; the others are optional.
    ``keep``: (column, value) - only rows whose column equals value are kept (XSTest: the safe prompts)."""

    title: str
    prompt: str
    category: str | None = None
    id: tuple[str, ...] = ()
    response: str | None = None
    context: str | None = None
    keep: tuple[str, str] | None = None
    note: str = ""

    def expected(self) -> str:
        optional = [c for c in (self.response, self.category, *self.id, self.context) if c]
        return (f"expected a {self.title} CSV with a header row containing '{self.prompt}'"
                + (f" (optional: {', '.join(repr(c) for c in optional)})" if optional else "") + self.note)


#: The benchmark CSV formats :func:`parse_benchmark` reads (kind -> columns). Header names are matched
#: case-insensitively. HarmBench's ``ContextString`` (contextual behaviours) is put before the behaviour
#: as in HarmBench's own prompt ("<context>\n\n---\n\n<behavior>").
BENCHMARKS: dict[str, Benchmark] = {
    "harmbench": Benchmark("HarmBench", "Behavior", "SemanticCategory", ("BehaviorID",), context="ContextString"),
    "jailbreakbench": Benchmark("JailbreakBench", "Goal", "Category", ("Index",), response="Target"),
    "strongreject": Benchmark("StrongREJECT", "forbidden_prompt", "category"),
    "xstest": Benchmark("XSTest", "prompt", "type", ("id", "id_v2"), keep=("label", "safe"),
                        note="; only the rows labelled 'safe' are kept (over-refusal prompts)"),
}


def detect_csv_kind(header: Sequence[str]) -> str:
    """The CSV format a header row (any case) belongs to: a key of :data:`BENCHMARKS`, ``advbench`` or ``csv``."""
    names = {h.strip().lower() for h in header}
    if "forbidden_prompt" in names:
        return "strongreject"
    if {"goal", "behavior"} <= names:
        return "jailbreakbench"
    if names & {"behavior", "behaviorid", "semanticcategory", "functionalcategory", "contextstring"}:
        return "harmbench"  # also without 'Behavior', so that the error names the missing column
    if {"prompt", "type"} <= names and names & {"label", "focus"} and "response" not in names:
        return "xstest"
    if "goal" in names and "prompt" not in names:
        return "advbench"
    return "csv"


def parse_benchmark(data: bytes, file: str, kind: str, require_response: bool = False) -> Dataset:
    """A benchmark CSV (see :data:`BENCHMARKS`) as a prompt-only dataset (JailbreakBench keeps its ``Target``
    as the response; with ``require_response`` it must be there). Ids: the id column, else ``<file stem>-NNNN``."""
    spec = BENCHMARKS[kind]
    text = _decode(data, file)
    stem = _stem(file)
    rows = _csv_rows(text, file)
    fix = spec.expected()
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise DataError("is empty", file=file, fix=fix) from None
    names = [h.strip().lower() for h in header]
    index = {h: i for i, h in reversed(list(enumerate(names))) if h}
    required = [spec.prompt] + ([spec.response] if require_response and spec.response else [])
    missing = [c for c in required if c.lower() not in index]
    if missing:
        raise DataError(f"missing column(s) {missing} in the header (found {[h for h in names if h]})",
                        file=file, line=header_line, field=missing[0], fix=fix)
    keep = spec.keep if spec.keep and spec.keep[0].lower() in index else None
    if spec.keep and not keep and kind == "xstest":  # XSTest v1 files have no label: contrast types are unsafe
        keep = ("type", "!contrast")
    id_column = next((c for c in spec.id if c.lower() in index), None)

    def cell(record: list[str], column: str | None) -> str:
        column = column.lower() if column else None
        return record[index[column]].strip() if column in index and index[column] < len(record) else ""

    items: list[tuple[Example, Where]] = []
    for line, record in rows:
        at = Where(file, line)
        if keep is not None:
            value = cell(record, keep[0]).lower()
            if (value.startswith("contrast") if keep[1] == "!contrast" else value != keep[1]):
                continue
        prompt = cell(record, spec.prompt)
        if not prompt:
            raise at.error("is empty (or the row is too short)", spec.prompt, fix)
        context = cell(record, spec.context)
        row: dict[str, Any] = {"prompt": f"{context}\n\n---\n\n{prompt}" if context else prompt}
        response = cell(record, spec.response)
        if response:
            row["response"] = response
        elif require_response:
            raise at.error("is empty", spec.response, fix)
        if cell(record, spec.category):
            row["category"] = cell(record, spec.category)
        if cell(record, id_column):
            row["id"] = cell(record, id_column)
        items.append((_row_to_example(row, at, f"{stem}-{len(items) + 1:04d}", require_response, aliases=False), at))
    empty = "no rows labelled 'safe'" if keep is not None else "the header is there but no data rows follow"
    return _build(stem, file, data, items, empty + " \u2014 " + fix)


def parse_text(data: bytes, file: str) -> Dataset:
    """Plain text, one prompt per line (blank lines skipped): a prompt-only dataset, ids ``<stem>-NNNN``."""
    text = _decode(data, file)
    stem = _stem(file)
    items: list[tuple[Example, Where]] = []
    for n, line in _lines(text):
        if line.strip():
            at = Where(file, n)
            items.append((_row_to_example({"prompt": line.strip()}, at, f"{stem}-{len(items) + 1:04d}", False), at))
    return _build(stem, file, data, items, "expected one prompt per line")


def detect_kind(filename: str, data: bytes | None = None) -> str:
    """The format (one of :data:`KINDS`) of a file from its name and, for CSV, its header row (``advbench``
    for a goal/target header). Raises :class:`DataError` when the name says nothing."""
    return _kind_from_name(filename, data, exact=True)


def _kind_from_name(filename: str, data: bytes | None = None, exact: bool = False) -> str:
    name = Path(filename).name.lower()
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".csv"):
        if HEXPHI_FILE.match(name) and data is not None:
            # HEx-PHI files have no header; a file with a prompt/goal header is an ordinary CSV
            try:
                first = next(_csv_rows(data.decode("utf-8-sig"), filename), (0, []))[1]
            except (UnicodeDecodeError, DataError):
                first = []
            cols = {c.strip().lower() for c in first}
            if not cols & {"prompt", "goal", "behavior", "forbidden_prompt"}:
                return "hexphi"
        if data is not None:  # benchmark CSVs are told apart by their header
            try:
                first = next(_csv_rows(data.decode("utf-8-sig"), filename), (0, []))[1]
            except (UnicodeDecodeError, DataError):
                first = []
            kind = detect_csv_kind(first)
            return "csv" if kind == "advbench" and not exact else kind  # parse_csv reads goal/target itself
        return "csv"
    if name.endswith(".txt"):
        return "text"
    raise DataError(
        "cannot tell the format from the file name",
        file=filename,
        fix="use a .jsonl, .json, .csv or .txt (one prompt per line) file, or pass kind= one of " + ", ".join(KINDS),
    )


def parse_bytes(data: bytes, file: str, kind: str | None, require_response: bool) -> Dataset:
    if kind is None:
        kind = _kind_from_name(file, data)
    if kind == "jsonl":
        return parse_jsonl(data, file, require_response)
    if kind == "json":
        return parse_json(data, file, require_response)
    if kind == "csv":
        return parse_csv(data, file, require_response)
    if kind == "advbench":
        return parse_csv(data, file, require_response, advbench=True)
    if kind == "hexphi":
        return parse_hexphi(data, file)
    if kind in BENCHMARKS or kind == "text":
        title = ("a " + BENCHMARKS[kind].title) if kind in BENCHMARKS else "a plain-text prompt"
        if require_response and (kind == "text" or BENCHMARKS[kind].response is None):
            raise DataError(f"is {title} file: prompts only, no responses", file=file,
                            fix="use it as a prompt set for evaluation (harmful or benign prompts), "
                                "or give a file with responses (JSONL/CSV with 'prompt' and 'response')")
        if kind == "text":
            return parse_text(data, file)
        return parse_benchmark(data, file, kind, require_response)
    raise DataError(f"unknown kind {kind!r}", file=file, fix="kind must be one of " + ", ".join(KINDS))


