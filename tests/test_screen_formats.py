"""Fine-tuning data formats (analysis.llm.formats): Alpaca, Dolly, chat messages and ours load with errors naming
line and field, and a subset exported by the screening views re-loads in the input's own format."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.llm.data import DataError, load_any, load_bytes, load_jsonl
from analysis.llm.formats import row_format, source_rows
from analysis.views.screen import export_subset, input_format

ROWS = {
    "alpaca": [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
               {"instruction": "Translate to English.", "input": "Bonjour", "output": "Hello"},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}],
    "dolly": [{"instruction": "When did Virgin Australia start?", "context": "Virgin Australia began on 31 August 2000.",
               "response": "31 August 2000.", "category": "closed_qa"},
              {"instruction": "Which is a fish: tope or rope?", "context": "", "response": "Tope.",
               "category": "classification"},
              {"instruction": "Name a prime.", "context": "", "response": "7", "category": "open_qa"}],
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}]},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
             {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}],
    "ours": [{"id": "a", "prompt": "Say yes", "response": "Yes", "category": "x"},
             {"id": "b", "prompt": "Say no", "response": "No", "split": "train"},
             {"id": "c", "prompt": "Say maybe", "response": "Maybe"}],
}


def write(path, rows, array=False):
    path.write_text(json.dumps(rows) if array else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_and_dolly_become_prompt_and_response():
    alpaca = load_bytes("".join(json.dumps(r) + "\n" for r in ROWS["alpaca"]).encode(), "a.jsonl")
    assert [ex.prompt for ex in alpaca] == ["Give three tips for staying healthy.", "Translate to English.\n\nBonjour",
                                            "Add the numbers.\n\n2 and 3"]
    assert alpaca[1].response == "Hello"
    dolly = load_bytes("".join(json.dumps(r) + "\n" for r in ROWS["dolly"]).encode(), "d.jsonl")
    assert dolly[0].prompt == "When did Virgin Australia start?\n\nVirgin Australia began on 31 August 2000."
    assert [ex.category for ex in dolly] == ["closed_qa", "classification", "open_qa"]
    assert [row_format(r) for rows in ROWS.values() for r in rows[:1]] == list(ROWS)


@pytest.mark.parametrize("text, match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": ""}\n', r"line 2, field 'output': is missing"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "  ", "output": "d"}\n', r"line 2, field 'instruction': is empty"),
    ('{"instruction": "q", "context": ["x"], "response": "r"}\n', r"line 1, field 'context': must be a string"),
    ('{"instruction": "q", "context": "", "response": ""}\n', r"line 1, field 'response': is empty"),
    ('{"instruction": "q", "prompt": "p", "response": "r"}\n', r"line 1, field 'instruction': has both"),
])
def test_errors_name_the_line_and_the_rows_own_field(text, match):
    with pytest.raises(DataError, match=match):
        load_bytes(text.encode(), "data.jsonl")


def test_prompt_only_instruction_rows_load_when_asked():
    data = load_bytes(b'{"instruction": "a"}\n{"instruction": "b", "input": "c"}\n', "p.jsonl", require_response=False)
    assert data.prompts_only and data[1].prompt == "b\n\nc"


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("array", [False, True])
def test_exported_subsets_reload_in_the_input_format(tmp_path, kind, array):
    path = write(tmp_path / ("data.json" if array else "data.jsonl"), ROWS[kind], array)
    dataset = load_any(str(path))
    raw = source_rows(dataset)
    assert raw == ROWS[kind]
    rows = pd.DataFrame({"index": range(len(dataset)), "source_row": raw})
    assert input_format(rows) == kind
    exported = export_subset(rows, [2, 0])
    (tmp_path / "subset.jsonl").write_bytes(exported)
    again = load_jsonl(tmp_path / "subset.jsonl")
    assert [ex.messages for ex in again] == [dataset[0].messages, dataset[2].messages]
    assert [row_format(json.loads(line)) for line in exported.decode().splitlines()] == [kind, kind]


def test_source_rows_of_a_split_and_of_a_changed_file(tmp_path):
    path = write(tmp_path / "ours.jsonl", ROWS["ours"])
    dataset = load_any(str(path))
    assert source_rows(dataset.split("train")) == [ROWS["ours"][1]]
    path.write_text(path.read_text() + json.dumps({"id": "d", "prompt": "p", "response": "r"}) + "\n")
    assert source_rows(dataset) is None  # edited since: never the wrong rows
    assert source_rows(load_any("utility"))[0]["id"] == load_any("utility")[0].id
