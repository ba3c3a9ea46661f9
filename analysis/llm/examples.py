"""Text data types: :class:`Example` (one conversation ending with the loss-carrying assistant response),
:class:`Dataset` (named examples plus source and content hash) and :class:`DataError` (where, what, how to fix).

Import them from :mod:`analysis.llm.data`, which also has the loaders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from analysis.core.config import InputError

__all__ = ["ROLES", "DataError", "Dataset", "Example", "Where", "check_text", "freeze_messages"]

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------
# errors


class DataError(InputError, ValueError):
    """A problem with input data; the message says where (file, line, field) and how to fix it."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
        where: str = "line",
    ) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.lines = [line] if line is not None else []  # every bad line reported (several for JSON Lines)
        self.field = field
        self.fix = fix
        parts = []
        if file is not None:
            parts.append(str(file))
        if line is not None:
            parts.append(f"{where} {line}")
        if field is not None:
            parts.append(f"field '{field}'")
        msg = (", ".join(parts) + ": " if parts else "") + problem
        if fix:
            msg += f" \u2014 {fix}"
        super().__init__(msg)


@dataclass(frozen=True)
class Where:
    """Location of a row, for error messages."""

    file: str
    line: int | None = None
    where: str = "line"

    def error(self, problem: str, field: str | None = None, fix: str | None = None) -> DataError:
        return DataError(problem, file=self.file, line=self.line, field=field, fix=fix, where=self.where)

    def describe(self) -> str:
        return f"{self.where} {self.line}" if self.line is not None else "?"


# --------------------------------------------------------------------------------------
# examples


def check_text(value: Any, name: str, at: Where | None = None) -> str:
    at = at or Where("<example>")
    if not isinstance(value, str):
        raise at.error(f"must be a string, got {type(value).__name__}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise at.error("contains an unpaired Unicode surrogate", name, "re-encode the text as valid UTF-8") from None
    return value


def freeze_messages(messages: Iterable[Any], at: Where | None = None, field_name: str = "messages"):
    at = at or Where("<example>")
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise at.error(
            f"must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}", field_name
        )
    out = []
    for i, m in enumerate(messages):
        f = f"{field_name}[{i}]"
        if not isinstance(m, Mapping):
            raise at.error(f"must be an object with 'role' and 'content', got {type(m).__name__}", f)
        if "role" not in m:
            raise at.error("missing 'role'", f, "give each message a 'role' of system, user or assistant")
        if "content" not in m:
            raise at.error("missing 'content'", f, "give each message a 'content' string")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise at.error(f"role must be one of system, user, assistant; got {role!r}", f + ".role")
        content = check_text(m["content"], f + ".content", at)
        out.append({"role": role, "content": content})
    if not out:
        raise at.error("is empty", field_name, "a conversation needs a user message and a final assistant message")
    if out[-1]["role"] != "assistant":
        raise at.error(
            f"must end with an assistant message (the response that carries the loss), ends with {out[-1]['role']!r}",
            field_name,
        )
    for i, m in enumerate(out):
        if m["role"] == "system" and i != 0:
            raise at.error("a system message may only come first", f"{field_name}[{i}].role")
    users = [i for i, m in enumerate(out) if m["role"] == "user"]
    if not users:
        raise at.error("has no user message", field_name, "add the prompt as a message with role 'user'")
    if not out[users[-1]]["content"].strip():
        raise at.error("the last user message (the prompt) is empty", f"{field_name}[{users[-1]}].content")
    return tuple(out)


@dataclass(frozen=True)
class Example:
    """One conversation; the LAST message is the assistant response that carries the loss.

    ``messages`` is a tuple of ``{"role": "system"|"user"|"assistant", "content": str}``
    dicts (copied and validated on construction: an optional leading system message, at
    least one user message, ending with an assistant message).  A prompt-only example has
    a final assistant message with empty content.
    """

    messages: tuple[dict, ...]
    id: str
    category: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", freeze_messages(self.messages))
        check_text(self.id, "id")
        if not self.id:
            raise DataError("must not be empty", field="id")
        for name in ("category", "split"):
            value = getattr(self, name)
            if value is not None:
                check_text(value, name)

    def __hash__(self) -> int:  # dicts are unhashable; hash the content instead
        return hash((self.id, self.category, self.split, tuple((m["role"], m["content"]) for m in self.messages)))

    @classmethod
    def from_prompt(
        cls,
        prompt: str,
        response: str,
        system: str | None = None,
        id: str | None = None,
        category: str | None = None,
        split: str | None = None,
    ) -> Example:
        """Build a single-turn example.  Without ``id`` one is derived from the content."""
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": response})
        if id is None:
            id = "ex-" + _digest(repr((system, prompt, response)))[:12]
        return cls(messages=tuple(messages), id=id, category=category, split=split)

    @property
    def prompt(self) -> str:
        """Content of the last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str:
        """Content of the final assistant message (``""`` for prompt-only examples)."""
        return self.messages[-1]["content"]

    @property
    def system(self) -> str | None:
        """Content of the system message, or None."""
        return self.messages[0]["content"] if self.messages[0]["role"] == "system" else None

    @property
    def context(self) -> tuple[dict, ...]:
        """Every message before the response: what a model is given to generate from."""
        return self.messages[:-1]

    @property
    def has_response(self) -> bool:
        return bool(self.response)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------------------
# datasets


@dataclass
class Dataset:
    """A named list of examples.

    ``source`` is where it came from (a path, or the upload's file name) and
    ``content_hash`` the sha256 of the source bytes; subsets made by :meth:`split` and
    :meth:`take` keep both (the cache key of a run must also record the split / take
    arguments; :meth:`fingerprint` hashes the examples actually present).
    """

    name: str
    examples: list[Example]
    source: str = ""
    content_hash: str = ""

    def __post_init__(self) -> None:
        self.examples = list(self.examples)
        seen: dict[str, int] = {}
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, Example):
                raise DataError(f"examples[{i}] is a {type(ex).__name__}, not an Example", file=self.source or None)
            if ex.id in seen:
                raise DataError(
                    f"duplicate id {ex.id!r} (examples {seen[ex.id]} and {i})",
                    file=self.source or None,
                    field="id",
                    fix="give every example a unique id",
                )
            seen[ex.id] = i
        with_response = sum(ex.has_response for ex in self.examples)
        if 0 < with_response < len(self.examples):
            missing = next(ex.id for ex in self.examples if not ex.has_response)
            raise DataError(
                f"mixes examples with and without a response (e.g. {missing!r} has none)",
                file=self.source or None,
                field="response",
                fix="give every example a response, or none for a prompt-only dataset",
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def prompts_only(self) -> bool:
        """True when no example has a response (generation / evaluation only, no loss)."""
        return bool(self.examples) and not any(ex.has_response for ex in self.examples)

    @property
    def prompts(self) -> list[str]:
        return [ex.prompt for ex in self.examples]

    @property
    def responses(self) -> list[str]:
        return [ex.response for ex in self.examples]

    def _derive(self, name: str, examples: list[Example]) -> Dataset:
        return Dataset(name=name, examples=examples, source=self.source, content_hash=self.content_hash)

    def splits(self) -> dict[str, int]:
        """Counts per split, in order of first appearance (None -> ``"(none)"``)."""
        return _count(ex.split for ex in self.examples)

    def categories(self) -> dict[str, int]:
        """Counts per category, in order of first appearance (None -> ``"(none)"``)."""
        return _count(ex.category for ex in self.examples)

    def split(self, name: str) -> Dataset:
        """The examples whose ``split`` is ``name``, in file order."""
        chosen = [ex for ex in self.examples if ex.split == name]
        if not chosen:
            have = ", ".join(repr(s) for s in self.splits()) or "none"
            raise DataError(
                f"dataset {self.name!r} has no examples in split {name!r}",
                file=self.source or None,
                field="split",
                fix=f"splits present: {have}",
            )
        return self._derive(f"{self.name}:{name}", chosen)

    def filter_category(self, *categories: str) -> Dataset:
        """The examples in any of ``categories``, in file order."""
        wanted = set(categories)
        chosen = [ex for ex in self.examples if ex.category in wanted]
        if not chosen:
            raise DataError(
                f"dataset {self.name!r} has no examples in categories {sorted(wanted)}",
                file=self.source or None,
                field="category",
                fix="categories present: " + ", ".join(self.categories()),
            )
        return self._derive(f"{self.name}[{','.join(categories)}]", chosen)

    def take(self, n: int, seed: int | str = 0) -> Dataset:
        """A deterministic, seeded subsample of ``n`` examples, kept in file order.

        Examples are ranked by ``sha256(f"{seed}:{id}")``, so the result depends only on the
        seed and the ids (not on Python's RNG), and for one seed ``take(10)`` is a subset of
        ``take(50)``, which is a subset of ``take(100)`` - handy for k-shot attacks.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"the number of examples must be a non-negative integer, got {n!r}")
        if n > len(self.examples):
            raise DataError(
                f"asked for {n} examples but dataset {self.name!r} has only {len(self.examples)}",
                file=self.source or None,
                fix=f"ask for at most {len(self.examples)}",
            )
        ranked = sorted(range(len(self.examples)), key=lambda i: _digest(f"{seed}:{self.examples[i].id}"))
        keep = sorted(ranked[:n])
        return self._derive(f"{self.name}:take{n}@{seed}", [self.examples[i] for i in keep])

    def fingerprint(self) -> str:
        """sha256 over the examples present (ids, metadata and messages), in order."""
        h = hashlib.sha256()
        for ex in self.examples:
            rec = [ex.id, ex.category, ex.split, [[m["role"], m["content"]] for m in ex.messages]]
            h.update(json.dumps(rec, ensure_ascii=True).encode("ascii"))
            h.update(b"\n")
        return h.hexdigest()

    def to_records(self) -> list[dict]:
        """Rows as written by :func:`load_jsonl` (single-turn rows use prompt/response)."""
        rows = []
        for ex in self.examples:
            row: dict[str, Any] = {"id": ex.id}
            if ex.category is not None:
                row["category"] = ex.category
            if ex.split is not None:
                row["split"] = ex.split
            roles = [m["role"] for m in ex.messages]
            if roles in (["user", "assistant"], ["system", "user", "assistant"]):
                if ex.system is not None:
                    row["system"] = ex.system
                row["prompt"] = ex.prompt
                row["response"] = ex.response
            else:
                row["messages"] = [dict(m) for m in ex.messages]
            rows.append(row)
        return rows


def _count(values: Iterable[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        k = "(none)" if v is None else v
        out[k] = out.get(k, 0) + 1
    return out

