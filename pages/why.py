"""Why does the defence fail? The geometry of a fine-tuning attack's update against the safety subspaces."""

import pandas as pd
import streamlit as st

from analysis.core.config import InputError
from analysis.lab import finetune
from analysis.lab import why as lab_why
from analysis.views import why as why_views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

st.title("Why does the defence fail?")
st.caption("Take a finished fine-tuning run and ask where its weight update dW = W_fine-tuned − W_aligned points: "
           "per linear module, the principal angles between dW's top-k singular subspace and three safety subspaces "
           "of the aligned model — the refusal gradient (what SPF protects), the compliance gradient (CE of “Sure, here "
           "is …”) and the alignment delta W_aligned − W_base (what Safe LoRA protects) — against random subspaces "
           "(overlap k/d). Also: how far the safety subspace itself moves during and by the fine-tuning, and in which "
           "response tokens the safety gradient lives (shallow alignment).")

# ---- 1 · run ---------------------------------------------------------------------------------------------
st.header("1 · Fine-tuning run", divider="gray")
runs = finetune.list_finetune_runs()
finished = runs[runs["status"] == "complete"] if not runs.empty else runs
if finished.empty:
    st.info("No finished fine-tuning run yet. Train one on the Fine-tune page first.")
    st.page_link("pages/finetune.py", label="Fine-tune: does SPF keep it safe?", icon=":material/model_training:")
    st.stop()
labels = {row.run_id: f"{row.run_id} · {row.preset} / {row.method}" + (f" ({row.spf})" if row.spf else "")
          for row in finished.itertuples()}
run_id = common.remembered_widget("why.run", st.selectbox, "Run", list(labels), format_func=labels.get,
                                  value=next(iter(labels)))
if run_id not in labels:
    st.stop()
result = finetune.load_finetune_run(run_id)
left, middle, right = st.columns(3, gap="large")
with left:
    bases = {key: label for key, label in common.MODEL_CHOICES.items() if key != "other"}
    base = common.remembered_widget("why.base", st.selectbox, "Base model (before alignment)", list(bases),
                                    format_func=bases.get, value="default",
                                    help="the alignment delta is W_aligned − W_base; the aligned model is the run's")
with middle:
    k = common.setting_input(lab_why.WhyTask, "k", "Subspace size k (per module)", max_value=64)
    n_prompts = common.setting_input(lab_why.WhyTask, "n_prompts", "Harmful prompts for the gradients", min_value=2,
                                     max_value=128)
with right:
    first_tokens = common.setting_input(lab_why.WhyTask, "first_tokens", "First N response tokens", max_value=64)
    side = st.radio("Singular vectors", ("left", "right"), horizontal=True, key="widget.why.side",
                    format_func=lambda s: {"left": "left (output side)", "right": "right (input side)"}[s])

# ---- 2 · drift during training (from the run itself) --------------------------------------------------------
st.header("2 · Does the safety subspace move during fine-tuning?", divider="gray")
st.caption("At every refresh of the safety basis (every R steps; in plain runs too, as a measurement) the top-k "
           "subspace of that step's safety gradient is compared with the step-1 subspace. Each refresh draws its own "
           "safety batch, as SPF does, so this includes the batch-to-batch variation; section 3 compares the aligned "
           "and the fine-tuned model on the same prompts.")
drift = why_views.drift_frame(result.drift())
export_id = f"why_{run_id}"
common.show_figure(why_views.drift_figure(drift, result.config.get("preset", "")), export_id, "drift")
if not drift.empty:
    if drift["step"].nunique() < 2:
        st.caption(f"The basis was refreshed only at step 1 (R = {result.config['spf']['refresh']} ≥ the run's "
                   f"{result.manifest.get('total_steps')} steps): train with a smaller R to see the drift step by step. "
                   "Section 3 compares the start and the end.")
    common.data_downloads(drift, export_id, "drift")

# ---- 3 · the explanation (a job) ------------------------------------------------------------------------------
st.header("3 · The update against the safety subspaces", divider="gray")
try:
    task = lab_why.WhyTask(run=run_id, base=base, k=int(k), n_prompts=int(n_prompts), first_tokens=int(first_tokens))
    why_id = task.run_id()
except InputError as error:
    st.error(str(error))
    st.stop()
st.caption("Measured on the aligned SmolLM2, harmful-10 plain (ASR 9% → 99%), k = 8, 16 prompts: the update's "
           "subspace overlaps the compliance subspace φ = 0.22 / 0.38 (left / right; random 0.019 / 0.013) but the "
           "refusal subspace only 0.07 / 0.13, and cos(dW, G_refusal) ≈ 0 while cos(dW, G_compliance) ≈ −0.21: the attack "
           "raises “Sure, here is” along directions a refusal-gradient basis barely holds.")
stored = lab_why.load_why(task)
job = ui_jobs.job_panel(task, what="The analysis", label=f"why: {run_id}", stored=stored is not None,
                        stored_text=f"Analysed: the stored result of run {run_id} with these settings is shown below.",
                        todo_text="Not analysed yet. The job loads the aligned, fine-tuned and base models, takes the "
                                  "refusal and compliance gradients on the harmful prompts and compares subspaces.",
                        button="Analyse", run_id=why_id)
if stored is None or (job is not None and job.active):
    st.stop()

summary, table, arrays = stored.summary, stored.table, stored.arrays
verdict = why_views.why_verdict(summary)
if verdict:
    st.info(f"**Answer.** {verdict}")
subtitle = f"{run_id}, k = {summary['k']}"
common.show_figure(why_views.overlap_by_layer_figure(table, side, subtitle=subtitle), export_id, f"overlap_{side}")
pair = st.radio("Pair", list(why_views.PAIR_LABELS), format_func=why_views.PAIR_LABELS.get, horizontal=True,
                key="widget.why.pair")
common.show_figure(why_views.min_angle_heatmap(table, pair, side), export_id, f"min_angle_{pair}_{side}")
by_kind = why_views.group_summary(table, "kind", side)
st.markdown("**Per module kind** (mean over layers)")
common.show_table(by_kind)
common.data_downloads(table, export_id, "modules")

st.header("4 · How deep is the alignment?", divider="gray")
energy = why_views.token_energy_frame(arrays)
common.show_figure(why_views.token_energy_figure(energy, summary["first_tokens"], subtitle=subtitle), export_id,
                   "token_energy")
with st.expander("Per layer: where in the response is each layer's safety gradient?"):
    energy_set = st.radio("Gradient", list(why_views.ENERGY_SETS), format_func=why_views.ENERGY_SETS.get,
                          horizontal=True, key="widget.why.energy_set")
    common.show_figure(why_views.energy_by_layer_figure(arrays, energy_set, subtitle=subtitle), export_id,
                       f"energy_by_layer_{energy_set}")
shares = {name: {"token energy, first N": summary["energy_first_share"].get(name),
                 "‖G_first N‖ / ‖G‖": summary["first_norm_share"].get(name),
                 "⟨G_first N, G⟩ / ‖G‖²": summary["first_share"].get(name)}
          for name in summary["energy_first_share"]}
st.caption(f"N = {summary['first_tokens']}. G_first N: the part of the batch gradient from response positions "
           "0…N−1; the last two columns are measured on the aligned model only.")
common.show_table(pd.DataFrame(shares).T.rename_axis("gradient").reset_index())
common.data_downloads(energy, export_id, "token_energy")
