"""The defence registry: a defence declared in this file alone trains through the trainer and reaches the grid
and the CLI; no module under analysis/ branches on a defence's name; lookups fail with the choices."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError
from analysis.lab import defences
from analysis.lab.defences import Defence, Needs, Variant

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


class HalfStep(Defence):
    """A throw-away defence: halves every selected module's fine-tuning gradient and counts its refreshes."""

    name = "test-half-step"
    label = "half step"
    description = "halve the fine-tuning gradient of every selected module (a test)"
    needs = Needs(safety_gradient=True, weight_gradients=True)
    variants = (Variant("test-half", "the half step, as a grid row", method="test-half-step"),)

    def __init__(self, config, projector=None):
        super().__init__(config, projector)
        self.refreshed: list[int] = []

    def refresh(self, step, safety, *, zero, generator):
        self.refreshed.append(step)
        return {"half_refreshes": float(len(self.refreshed))}

    def before_step(self, step, grads):
        for G in grads.values():
            G.mul_(0.5)  # in place: a view of the module's .grad
        return {"half_modules": float(len(grads))}


@pytest.fixture
def half_step():
    defences.register(HalfStep)
    try:
        yield HalfStep
    finally:
        defences.unregister(HalfStep.name)


def tiny_config(**overrides):
    from analysis.core.config import ModelConfig
    from analysis.lab.config import preset

    values = dict(model=ModelConfig("tiny-llama", dtype="float64"), max_length=96, eval_harmful_per_category=1,
                  n_eval_utility=2, gen_harmful_per_category=1, n_gen_benign=2, gen_max_new_tokens=4,
                  gen_batch_size=16, lr=1e-2, n_train=6, batch_size=3, epochs=2, optimizer="sgd", trainable="linear",
                  spf=dict(refresh=1, safety_batch=2))
    values.update(overrides)
    return preset("harmful-10", **values)


def step_change(trainer) -> dict[str, torch.Tensor]:
    """W_before - W_after of every selected module after ``train_step(1)``."""
    before = {m.name: m.weight.detach().clone() for m in trainer.projector.modules}
    trainer.row = trainer.train_step(1)
    return {m.name: before[m.name] - m.weight.detach() for m in trainer.projector.modules}


def test_a_defence_registered_in_a_test_file_trains_through_the_trainer(half_step):
    from analysis.lab.trainer import FinetuneTrainer, run_id_for

    config = tiny_config(method="test-half-step")
    assert config.label == "harmful-10 / test-half-step"
    assert run_id_for(config, "weights").startswith("harmful-10-test-half-step-")
    assert run_id_for(config, "weights") != run_id_for(tiny_config(method="plain"), "weights")
    half = FinetuneTrainer.create(config)
    plain = FinetuneTrainer.create(tiny_config(method="plain"))
    assert isinstance(half.defence, HalfStep) and half.projector.modules  # it asked for gradients: modules selected
    got, expected = step_change(half), step_change(plain)
    assert set(got) == set(expected) and len(got) == len(half.projector.modules)
    for name in got:  # SGD: the update is lr * gradient, so the half step moves every weight exactly half as far
        assert float(expected[name].abs().max()) > 0
        torch.testing.assert_close(got[name], 0.5 * expected[name], rtol=1e-10, atol=1e-14)
    assert half.row["half_modules"] == len(got) and half.row["half_refreshes"] == 1
    assert half.row["basis_skipped"] == 0 and half.row["safety_grad_norm"] > 0  # it needs the safety gradient
    assert half.row["train_loss"] == plain.row["train_loss"]  # same batch, same start
    half.train_step(2)
    assert half.defence.refreshed == [1, 2]  # refresh = 1: every step


def test_the_new_defence_reaches_the_config_check_the_cli_the_grid_and_the_views(half_step):

    from analysis.lab import grid
    from analysis.lab.config import DEFENCES

    assert "test-half-step" in defences.training_names() and "test-half-step" in DEFENCES
    with pytest.raises(ConfigError, match="test-half-step.*LoRA"):  # Needs.weight_gradients: LoRA refused
        tiny_config(method="test-half-step", trainable="lora")
    from analysis.__main__ import parse_task

    task = parse_task("finetune", ["--model", "tiny-llama", "--mode", "test-half-step"])
    assert task.config.method == "test-half-step" and not task.compare
    assert "test-half" in grid.DEFENCES and "test-half" not in grid.DEFAULT_DEFENCES  # not in the default grid
    cell = grid.DefenceGridTask(model="tiny-llama", base="tiny-llama", defences=("none", "test-half"))
    assert cell.finetune_config("harmful-10", "test-half").method == "test-half-step"
    assert cell.n_runs() == 3 and defences.role_of("test-half") == "defence"  # one run per tier

    class Stored:
        config = {"method": "test-half-step", "spf": {}}

    from analysis.views.safety import _arm_label

    assert _arm_label(Stored) == "half step"


def test_after_unregistering_the_name_is_refused_with_the_choices():
    from analysis.lab.grid import DefenceGridTask

    with pytest.raises(ConfigError, match="method 'test-half-step' is not one of plain, spf, pcgrad$"):
        tiny_config(method="test-half-step")
    with pytest.raises(defences.UnknownDefence, match="unknown defence 'vaccine', available: plain, spf, pcgrad, "
                                                      "safe-lora"):
        defences.get("vaccine")
    with pytest.raises(ConfigError, match="post-hoc"):
        tiny_config(method="safe-lora")
    with pytest.raises(ConfigError, match="unknown defence.*test-half.*choose from none, plain, spf, pcgrad, orth"):
        DefenceGridTask(defences=("none", "test-half"))


def test_registering_refuses_taken_names_and_unknown_roles():
    class OtherSPF(HalfStep):
        name = "spf"

    class StealsAVariant(HalfStep):
        name = "test-thief"
        variants = (Variant("orth", "not SPF's", method="test-thief"),)

    class BadRole(HalfStep):
        name = "test-bad-role"
        variants = (Variant("test-bad", "a row", role="winner"),)

    for cls, message in ((OtherSPF, "'spf' is taken"), (StealsAVariant, "'orth' is taken by defence 'spf'"),
                         (BadRole, "role 'winner' is not one of baseline, attack, defence")):
        with pytest.raises(ValueError, match=message):
            defences.register(cls)
    assert defences.get("spf").label == "SPF" and defences.variant("orth").method == "spf"
    assert "test-thief" not in defences.available() and "test-bad-role" not in defences.available()


def test_the_shipped_defences_declare_what_they_need_and_their_grid_rows():
    shipped = defences.available()
    assert list(shipped) == ["plain", "spf", "pcgrad", "safe-lora"]
    assert {name: (d.needs.safety_gradient, d.needs.weight_gradients, d.needs.post_hoc) for name, d in shipped.items()} == {
        "plain": (False, False, False), "spf": (True, True, False), "pcgrad": (True, True, False),
        "safe-lora": (False, False, True)}
    assert shipped["spf"].needs.safety_basis and shipped["safe-lora"].needs.reference_weights
    rows = defences.variants()
    assert list(rows) == ["none", "plain", "spf", "pcgrad", "orth", "same", "safe-lora", "spf-compliance", "spf-kl"]
    assert [name for name, v in rows.items() if v.default] == ["none", "plain", "spf", "pcgrad", "orth", "same",
                                                              "safe-lora"]
    assert {v.role for v in rows.values()} == {"baseline", "attack", "defence"}
    assert rows["safe-lora"].method == "plain" and rows["safe-lora"].post_hoc == "safe-lora"
    assert all(v.description for v in rows.values())
    from analysis.lab.grid import DefenceGridTask

    # the default grid trains plain, spf, pcgrad, orth and same once per tier; safe-lora projects plain's run
    assert DefenceGridTask(model="tiny-llama", base="tiny-llama").n_runs() == 3 * 5


def test_every_spf_mode_has_its_projection_and_same_is_a_known_answer():
    from analysis.engine.geometry import project_same
    from analysis.lab.config import SPF_MODES
    from analysis.lab.defences.spf import PROJECTIONS, SPF

    assert tuple(PROJECTIONS) == SPF_MODES == SPF.modes
    G = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    U = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # rows 1 and 3 span the subspace
    kept, removed = project_same(G, U)
    np.testing.assert_array_equal(kept, [[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]])
    assert removed == pytest.approx(5.0 / np.linalg.norm(G))
    assert project_same(np.zeros((3, 2)), U)[1] == 0.0


def _defence_words() -> dict[str, set[Path]]:
    """Every registered defence name, grid variant name and mode -> the file(s) allowed to branch on it."""
    words: dict[str, set[Path]] = {}
    for cls in defences.available().values():
        home = Path(inspect.getfile(cls)).resolve()
        for word in (cls.name, *cls.modes, *(v.name for v in cls.variants)):
            words.setdefault(word, set()).add(home)
    return words


#: (file, word): comparisons with the same word that are not about a defence
NOT_ABOUT_DEFENCES = {
    ("analysis/engine/collect_task.py", "none"),  # a module-selection text "none"
    ("analysis/safety/evaluate.py", "none"),   # EvalConfig.harmful_response == "none" (no NLL of answers)
}


def test_no_module_branches_on_a_defence_name_outside_its_file():
    """A comparison (==, !=, in, not in; also ``match``) with a defence's name, grid row or mode as a string
    is allowed only in that defence's own file; the pages and ui/ read the registry too (there the common word
    "none" is not checked). ``spf`` is also FinetuneConfig's field: subscripts and dict keys are not branches
    and are not checked."""
    words = _defence_words()
    assert {"plain", "spf", "pcgrad", "safe-lora", "conflict", "orthogonal", "same", "orth"} <= set(words)

    def strings(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return []

    found = []
    paths = [*(ROOT / "analysis").rglob("*.py"), *(ROOT / "pages").rglob("*.py"), *(ROOT / "ui").rglob("*.py"),
             ROOT / "app.py"]
    for path in sorted(paths):
        relative = path.relative_to(ROOT).as_posix()
        if not relative.startswith("analysis/"):
            allowed = {(relative, "none")}
        else:
            allowed = NOT_ABOUT_DEFENCES
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                operands = [node.value]
            else:
                continue
            for word in (w for operand in operands for w in strings(operand)):
                if word in words and path.resolve() not in words[word] and (relative, word) not in allowed:
                    found.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "branches on a defence's name outside its file:\n" + "\n".join(found)


def test_the_scan_would_catch_a_branch():
    """The scan above is not vacuous: the old trainer line is caught."""
    tree = ast.parse('if config.method == "pcgrad" or mode in ("conflict", "x"):\n    pass')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    words = _defence_words()
    hits = [c.value for n in compares for c in [n.left, *n.comparators] for c in ([c] if isinstance(c, ast.Constant)
            else getattr(c, "elts", [])) if isinstance(c, ast.Constant) and c.value in words]
    assert hits == ["pcgrad", "conflict"]


def test_looking_up_defences_imports_no_torch():
    """Discovery imports the defence files only: ``--help`` and the config check stay light."""
    code = ("import sys; from analysis.lab import defences; defences.variants(); defences.get('spf'); "
            "from analysis.lab.config import FinetuneConfig; FinetuneConfig(model='tiny-llama', method='pcgrad'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- one progress / cancel object with sub-ranges ----------------------------------------------------------------


def test_a_sub_context_maps_its_fractions_prefixes_its_messages_and_shares_cancel():
    from analysis.core.tasks import Cancelled, TaskContext

    events = []
    ctx = TaskContext(device="cpu", threads=1, progress=events.append)
    part = ctx.sub(0.2, 0.6, "utility")
    part.report(0.5, "half", live={"x": 1})
    part.sub(0.5, 1.0, "inner", keep_live=True).report(0.5, "deep", live={"y": 2})
    ctx.sub(0.0, 1.0, keep_live=True).report(2.0, "clipped", live={"z": 3})
    assert [(round(e.fraction, 12), e.message, e.live) for e in events] == [
        (0.4, "utility: half", None), (0.5, "utility: inner: deep", None), (1.0, "clipped", {"z": 3})]
    assert (part.device, part.threads, part.cancel) == ("cpu", 1, ctx.cancel)
    part.cancel.set()
    assert ctx.cancelled
    with pytest.raises(Cancelled):
        part.check_cancel()
    assert TaskContext().sub(0.1, 0.2, "x").progress is None  # nothing to forward to


# --- stored runs keep their ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "spf", "run_id"), [
    ("plain", {}, "harmful-10-plain-8c4f2d264262"),
    ("plain", {"k": 64, "mode": "orthogonal"}, "harmful-10-plain-8c4f2d264262"),  # projection-only: ignored
    ("spf", {}, "harmful-10-spf-6fc0fe258e92"),
    ("spf", {"mode": "same", "safety_loss": "kl"}, "harmful-10-spf-254b46977458"),
    ("pcgrad", {"refresh": 1, "safety_loss": "compliance"}, "harmful-10-pcgrad-ae52b2a3367d"),
])
def test_run_ids_are_those_of_the_layout_before_the_registry(method, spf, run_id):
    """Pinned with the code before the registry (commit 1ad621f) and fixed data fingerprints: the registry
    changed no FinetuneConfig field, so stored fine-tuning runs keep their ids."""
    from analysis.lab.config import preset
    from analysis.lab.trainer import run_id_for

    assert run_id_for(preset("harmful-10", method=method, spf=spf), "weights", {"train": "t", "safety": "s"}) == run_id


def test_the_default_grid_hashes_as_before():
    from analysis.core.config import config_hash, to_jsonable
    from analysis.core.options import without_legacy_defaults
    from analysis.lab.grid import DefenceGridTask

    # the evaluation sizes of the grid's default before issue 20 (22 harmful, 16 benign prompts)
    task = DefenceGridTask(model="tiny-llama", base="tiny-llama", n_harmful=22, n_benign=16)
    assert config_hash({"task": without_legacy_defaults(task, to_jsonable(task))}) == "45cb5dc4561b5b85"


def test_the_pages_offer_a_newly_registered_defence(half_step, tmp_path, monkeypatch):
    """The Fine-tune page's methods and the Defence lab's rows and texts come from the registry."""
    from tests.test_app import fresh_app, no_exceptions, seed_cache

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, **{"ft.model": "tiny-llama", "grid.model": "tiny-llama", "grid.base": "tiny-llama"})
    at = fresh_app()
    at.switch_page("pages/finetune.py").run()
    no_exceptions(at)
    assert list(at.radio(key="widget.ft.arms").options) == [
        "Plain vs SPF, side by side", "Plain fine-tuning only", "SPF only", "PCGrad only (whole-gradient projection)",
        "Half step only"]
    at.switch_page("pages/defences.py").run()
    no_exceptions(at)
    assert "test-half" in at.multiselect(key="widget.grid.defences").options
    assert any("**test-half**: the half step, as a grid row" in c.value for c in at.caption)
