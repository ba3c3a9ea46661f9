"""Defence lab — which defence holds against which attack? Every defence x every Qi et al. tier, one table."""

import streamlit as st

from analysis.core.config import InputError
from analysis.lab import defences, grid
from analysis.lab.config import PRESETS
from analysis.safety.results import load_evaluations
from analysis.views import defences as views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

VARIANTS = defences.variants()  # the grid's defences, each described by its own file

st.title("Defence lab: which defence holds?")
st.caption("Every defence against every attack tier of Qi et al. (2023), on the safety-aligned model, evaluated "
           "the same way: keyword ASR on held-out harmful prompts, over-refusal on benign-but-sensitive prompts, "
           "exact-match accuracy on the math / QA utility answers, and the NLLs. Fine-tuning runs use the Fine-tune "
           "page's presets, with the runs' own evaluations cut to a minimum; stored runs and evaluations are "
           "reused, so a grid only computes what is missing.")

st.header("1 · Grid", divider="gray")
models = {key: label for key, label in common.MODEL_CHOICES.items() if key != "other"}
left, right = st.columns(2, gap="large")
with left:
    source = common.remembered_widget("grid.model", st.selectbox, "Aligned model (every run starts here)", list(models),
                                      format_func=models.get, value="default-aligned")
    if source == "default-aligned" and not common.aligned_model_available():
        st.warning("The safety-aligned default model is not built yet; the defences have nothing to defend.")
        st.page_link("pages/safety.py", label="Build it on “Is the model safe?”", icon=":material/shield:")
        st.stop()
    base = common.remembered_widget("grid.base", st.selectbox, "Model before alignment (Safe LoRA's V = aligned − base)",
                                    list(models), format_func=models.get, value="default")
    for warning in views.grid_model_warnings(source, base):
        st.warning(warning, icon=":material/warning:")
    tiers = st.multiselect("Attack tiers", list(PRESETS), default=list(grid.TIERS), key="widget.grid.tiers", wrap=True,
                           help="; ".join(f"{name}: {preset.description.split('. ')[0]}" for name, preset in PRESETS.items()))
    chosen = st.multiselect("Defences", list(VARIANTS), default=list(grid.DEFAULT_DEFENCES),
                            key="widget.grid.defences", wrap=True)
    st.caption(" · ".join(f"**{name}**: {item.description}" for name, item in VARIANTS.items()))
with right:
    Grid = grid.DefenceGridTask
    n_harmful = common.setting_input(Grid, "n_harmful", "Harmful prompts evaluated (empty: all 88 held-out)",
                                     max_value=88)
    n_benign = common.setting_input(Grid, "n_benign", "Benign-sensitive prompts, over-refusal (empty: all)",
                                    max_value=64)
    max_new_tokens = common.setting_input(Grid, "max_new_tokens", "New tokens per answer (safety)", min_value=8,
                                          max_value=512)
    seeds_text = st.text_input("Training seeds (comma-separated)", value=str(Grid.seed), key="widget.grid.seeds",
                               help="each tier x defence x seed is a fine-tuning run of its own; the evaluation "
                                    "prompts are those of the first seed, so the seeds are paired on them")
try:
    seeds = common.parse_seeds(seeds_text)
    task = grid.DefenceGridTask(model=source, base=base, tiers=tuple(tiers), defences=tuple(chosen), n_harmful=n_harmful and int(n_harmful),
                                n_benign=n_benign and int(n_benign), max_new_tokens=int(max_new_tokens), seed=seeds[0],
                                seeds=seeds if len(seeds) > 1 else None)
    run_id = task.run_id()
except InputError as error:
    st.error(str(error))
    st.stop()
cells = task.cells()
stored_rows = grid.stored_rows(task)
measured_evaluations = load_evaluations(row.get("eval_run") for row in stored_rows)
st.caption(views.grid_cost_text(views.grid_cost(
    task, stored_rows, [row["train_seconds"] for row in stored_rows if row.get("train_seconds")],
    [e.seconds for e in measured_evaluations.values() if e is not None and e.seconds])))


def live_rows(live: dict) -> None:
    rows = live.get("rows") or []
    if rows:
        common.show_table(views.grid_table(rows))


st.header("2 · Run", divider="gray")
stored = {result.run_id: result for result in grid.stored_grids()}  # finished grids
job = ui_jobs.job_panel(task, what="The grid", label=f"defence grid: {len(tiers)} tiers x {len(chosen)} defences",
                        stored=run_id in stored, stored_text="This grid is stored; its table is below.",
                        button="Run the grid", live_view=live_rows, cancel_label="Cancel (finished cells are kept)",
                        run_id=run_id)

st.header("3 · Results", divider="gray")
shown = stored.get(run_id)
if shown is not None:
    rows, export_id = shown.rows, f"defences_{shown.run_id}"
else:
    rows, export_id = stored_rows, f"defences_{run_id}_partial"
    if not rows:
        st.info("No cell of this grid is stored yet.")
        st.stop()
    st.caption(f"{len(rows)} of {len(cells)} cells are stored so far (their runs and evaluations are reused when "
               "the grid runs).")
for line in views.grid_verdict(rows):
    st.markdown(f"- {line}")
evaluations = load_evaluations(row.get("eval_run") for row in rows)
paired = views.grid_paired_verdicts(rows, evaluations)
if paired:
    st.markdown("**Paired tests on the same prompts** (exact McNemar; a change is called a rise or fall when p < 0.05; "
                "95% Newcombe intervals in points):\n" + "\n".join(f"- {line}" for line in paired))
common.show_table(views.grid_table(rows, evaluations))
common.data_downloads(views.grid_export(rows, evaluations), export_id, "grid")
columns = st.columns(2)
for index, metric in enumerate(("asr", "utility_accuracy", "over_refusal", "utility_nll")):
    with columns[index % 2]:
        common.show_figure(views.grid_figure(rows, metric), export_id, metric)
