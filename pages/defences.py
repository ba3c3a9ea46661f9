"""Defence lab — which defence holds against which attack? Every defence x every Qi et al. tier, one table."""

import pandas as pd
import streamlit as st

from analysis.core.config import InputError
from analysis.lab import grid
from analysis.lab.config import PRESETS
from analysis.views import defences as views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

DESCRIPTIONS = {
    "none": "the aligned model, not fine-tuned (the baseline)",
    "plain": "plain fine-tuning (the attack as is)",
    "spf": "SPF: remove the update's components that conflict with the top-k refusal-gradient subspace",
    "pcgrad": "PCGrad: remove the whole gradient's conflicting component along the whole safety gradient",
    "orth": "SPF orthogonal (CERT-Lab orth): remove the whole safety-subspace component",
    "same": "SPF same (CERT-Lab same): keep only the safety-subspace component (a control)",
    "safe-lora": "Safe LoRA: project the plain run's weight change onto the alignment delta's subspace, post hoc",
    "spf-compliance": "SPF with the compliance signal (ascent on the affirmative “Sure, here is…” target's CE)",
    "spf-kl": "SPF with the KL-to-aligned signal on harmful prompts",
}

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
    defences = st.multiselect("Defences", list(grid.DEFENCES), default=list(grid.DEFAULT_DEFENCES),
                              key="widget.grid.defences", wrap=True)
    st.caption(" · ".join(f"**{name}**: {DESCRIPTIONS[name]}" for name in grid.DEFENCES))
with right:
    n_harmful = st.number_input("Harmful prompts evaluated (held-out split, seeded subsample)", 1, 88,
                                grid.DefenceGridTask.n_harmful, key="widget.grid.n_harmful")
    n_benign = st.number_input("Benign-sensitive prompts (over-refusal)", 1, 64, grid.DefenceGridTask.n_benign,
                               key="widget.grid.n_benign")
    max_new_tokens = st.number_input("New tokens per answer (safety)", 8, 512, grid.DefenceGridTask.max_new_tokens,
                                     key="widget.grid.tokens")
try:
    task = grid.DefenceGridTask(model=source, base=base, tiers=tuple(tiers), defences=tuple(defences), n_harmful=int(n_harmful),
                                n_benign=int(n_benign), max_new_tokens=int(max_new_tokens))
    run_id = task.run_id()
except InputError as error:
    st.error(str(error))
    st.stop()
cells = task.cells()
stored_cells = [(row["tier"], row["defence"]) for row in grid.stored_rows(task)]
st.caption(views.grid_cost_text(cells, stored_cells))


def live_rows(live: dict) -> None:
    rows = live.get("rows") or []
    if rows:
        common.show_table(views.grid_table(rows))


st.header("2 · Run", divider="gray")
job = ui_jobs.current("defences", run_id)
stored = {result.run_id: result for result in grid.stored_grids()}  # finished grids
if job is not None and job.active:
    ui_jobs.follow(job, live_view=live_rows, cancel_label="Cancel (finished cells are kept)")
else:
    if job is not None:
        ui_jobs.show_outcome(job, "The grid")
    if run_id in stored:
        st.success("This grid is stored; its table is below.")
    elif st.button("Run the grid", type="primary", icon=":material/play_arrow:"):
        ui_jobs.submit(task, f"defence grid: {len(tiers)} tiers x {len(defences)} defences")
        st.rerun()

st.header("3 · Results", divider="gray")
shown = stored.get(run_id)
if shown is not None:
    rows, export_id = shown.rows, f"defences_{shown.run_id}"
else:
    rows, export_id = grid.stored_rows(task), f"defences_{run_id}_partial"
    if not rows:
        st.info("No cell of this grid is stored yet.")
        st.stop()
    st.caption(f"{len(rows)} of {len(cells)} cells are stored so far (their runs and evaluations are reused when "
               "the grid runs).")
for line in views.grid_verdict(rows):
    st.markdown(f"- {line}")
common.show_table(views.grid_table(rows))
common.data_downloads(pd.DataFrame(rows), export_id, "grid")
columns = st.columns(2)
for index, metric in enumerate(("asr", "utility_accuracy", "over_refusal", "utility_nll")):
    with columns[index % 2]:
        common.show_figure(views.grid_figure(rows, metric), export_id, metric)
