"""Fine-tune — does SPF keep the model safe? Qi et al.'s attacks with plain fine-tuning and SPF, live."""

import dataclasses

import pandas as pd
import streamlit as st

from analysis.core.config import InputError
from analysis.lab import defences, finetune, safe_lora
from analysis.views import safety as safety_views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

TRAINING = {name: defences.get(name) for name in defences.training_names()}  # the registry's training defences
ARM_LABELS = {name: defence.label for name, defence in TRAINING.items()}


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


ARMS = {"both": f"{' vs '.join(_upper_first(ARM_LABELS[m].split()[0]) for m in finetune.METHODS)}, side by side",
        **{name: f"{_upper_first(label)} only" + (f" ({TRAINING[name].hint})" if TRAINING[name].hint else "")
           for name, label in ARM_LABELS.items()}}
SPF_MODE_HELP = ("conflict: remove only the components that would raise the safety loss; orthogonal (CERT-Lab "
                 "'orth'): remove the whole safety-subspace component U_k U_k^T G; same (CERT-Lab 'same', the control "
                 "arm): keep only U_k U_k^T G, i.e. update only along safety directions")
SAFETY_LOSS_HELP = ("refusal: CE of refusals on harmful prompts (the paper's safety gradient); contrast: refusal CE minus "
                    "the CE of 'Sure, here is how to do that', so the subspace also holds the direction in which the "
                    "model starts to comply; compliance: minus the CE of that affirmative target alone (the ascent "
                    "direction of compliance); kl: KL(aligned || current) on the refusals' response tokens "
                    "(SafeGrad's reading). KL is zero at the first step, so its first refresh keeps no subspace and "
                    "projects nothing (the history's basis_skipped column says so); the reference is the initial "
                    "weights the trainer already keeps: no extra memory, one more forward per refresh")
MAIN_METRICS = ("asr", "refusal_nll", "utility_nll", "cos_mean")

st.title("Fine-tune: does SPF keep the model safe?")
st.caption("Fine-tune a safety-aligned model the way Qi et al. (2023) broke Llama-2-chat — 10–100 harmful examples, an "
           "identity-shifting persona (AOA), or plain benign data — once as is and once with safety-preserving "
           "fine-tuning (SPF: before each step, the fine-tuning gradient of every selected module loses its components "
           "that conflict with the top-k safety-gradient subspace). Both arms share seed, data and settings.")

# ---- settings ---------------------------------------------------------------------------------------
st.header("1 · Attack and settings", divider="gray")
models = {key: label for key, label in common.MODEL_CHOICES.items() if key != "other"}
left, middle, right = st.columns(3, gap="large")
with left:
    source = common.remembered_widget("ft.model", st.selectbox, "Model", list(models), format_func=models.get,
                                      value="default-aligned")
    if source == "default-aligned" and not common.aligned_model_available():
        st.warning("The safety-aligned default model is not built yet; fine-tuning the unaligned model shows nothing "
                   "to lose.")
        st.page_link("pages/safety.py", label="Build it on “Is the model safe?”", icon=":material/shield:")
        st.stop()
    preset_name = common.remembered_widget("ft.preset", st.selectbox, "Attack (preset after Qi et al.)",
                                           list(finetune.PRESETS), value="harmful-10")
    st.caption(finetune.PRESETS[preset_name].description.split(" Scaled for")[0])
    arms = common.remembered_widget("ft.arms", st.radio, "Method", list(ARMS), format_func=ARMS.get, value="both",
                                    help="; ".join(defence.description for defence in TRAINING.values()))
base = finetune.preset(preset_name)
with middle:
    st.markdown("**Training**")
    lr = st.number_input("Learning rate", min_value=1e-7, max_value=1e-2, value=base.lr, format="%.1e",
                         key=f"widget.ft.lr.{preset_name}")
    epochs = st.number_input("Epochs", min_value=1, max_value=50, value=base.epochs, key=f"widget.ft.epochs.{preset_name}")
    batch_size = st.number_input("Batch size", min_value=1, max_value=128, value=base.batch_size,
                                 key=f"widget.ft.batch.{preset_name}")
    trainable = st.selectbox("What trains", finetune.TRAINABLE, index=finetune.TRAINABLE.index(base.trainable),
                             key="widget.ft.trainable",
                             help="blocks: every transformer block (default); last: the last N blocks; linear: only "
                                  "the blocks' linear weights; all: with embeddings; lora: adapters (plain arm only)")
    seed = st.number_input("Seed", min_value=0, value=0, key="widget.ft.seed")
with right:
    others = [d.label for d in TRAINING.values() if d.needs.safety_gradient and not d.needs.safety_basis]
    st.markdown("**SPF**" + (f" ({' and '.join(others)} also use R, the safety batch and the safety loss)"
                             if others else ""))
    k = st.number_input("Safety subspace size k (per module)", min_value=1, max_value=256, value=base.spf.k,
                        key="widget.ft.k")
    refresh = st.number_input("Refresh the subspace every R steps", min_value=1, max_value=1000,
                              value=base.spf.refresh, key="widget.ft.refresh")
    safety_batch = st.number_input("Safety batch (refusals per refresh; 1 allowed)", min_value=1, max_value=64,
                                   value=base.spf.safety_batch, key="widget.ft.safety_batch")
    mode = st.radio("Projection", finetune.SPF_MODES, horizontal=True, key="widget.ft.mode", help=SPF_MODE_HELP)
    target = st.radio("Project", finetune.SPF_TARGETS, horizontal=True, key="widget.ft.target",
                      help="gradient: the fine-tuning gradient before AdamW (the paper's reading); update: AdamW's actual "
                           "weight change (keeps the first-order guarantee under Adam)")
    safety_loss = st.radio("Safety signal", finetune.SAFETY_LOSSES, horizontal=True, key="widget.ft.safety_loss",
                           help=SAFETY_LOSS_HELP)
    spf_layers = st.text_input("SPF layers", value="all", key="widget.ft.spf_layers")
    st.caption("Measured on the aligned SmolLM2: with these defaults ASR rises as with plain fine-tuning "
               "(harmful-10 and AOA: 99%). Orthogonal + update + contrast, k=64, R=1, safety batch 8 held "
               "harmful-10 at 28%, not AOA (97%), and on benign data raised over-refusal to 84%.")

try:
    config = finetune.preset(
        preset_name, model=source, lr=float(lr), epochs=int(epochs), batch_size=int(batch_size), trainable=trainable,
        seed=int(seed), spf=dict(k=int(k), refresh=int(refresh), safety_batch=int(safety_batch), mode=mode,
                                 target=target, safety_loss=safety_loss, layers=spf_layers))
    task = finetune.FinetuneTask(config if arms == "both" else dataclasses.replace(config, method=arms),
                                 compare=arms == "both")
    run_ids = task.run_ids()
    methods = tuple(run_ids)
except InputError as error:
    st.error(str(error))
    st.stop()

# ---- run ----------------------------------------------------------------------------------------------
st.header("2 · Run", divider="gray")
def live_curves(live: dict) -> None:
    """The job's live history of each arm, on shared axes."""
    histories = {ARM_LABELS.get(method, method): pd.DataFrame(history)
                 for method, history in (live.get("rows") or {}).items() if history}
    columns = st.columns(2)
    for index, metric in enumerate(MAIN_METRICS):
        figure = safety_views.finetune_curve_figure(histories, metric)
        figure.update_layout(height=360)
        columns[index % 2].plotly_chart(figure, theme=None, config=common.CHART_CONFIG, key=f"ft.live.{metric}")


stored = finetune.stored_runs(run_ids)
complete = {method: results for method, results in stored.items() if results.status == "complete"}
todo = [method for method in methods if method not in complete]
resumable = [method for method in todo if method in stored]
ui_jobs.job_panel(task, what="Fine-tuning", label=f"{config.preset} on {models.get(source, source)}: {', '.join(todo)}",
                  stored=not todo, live_view=live_curves, cancel_label="Cancel (resumable)",
                  stored_text=f"Stored: {', '.join(run_ids.values())} — the results are below. Change a setting to "
                              "train anew.",
                  todo_text=f"{len(todo)} arm(s) to train: {', '.join(todo)} (evaluations by generation at the start "
                            "and end included)."
                            + (f" Interrupted run(s) resume from their checkpoint: {', '.join(resumable)}."
                               if resumable else ""),
                  button="Resume" if resumable else "Start")

# ---- results ------------------------------------------------------------------------------------------
if not complete:
    st.stop()
st.header("3 · Results", divider="gray")
labelled = {method: complete[method] for method in methods if method in complete}
table = finetune.comparison_table(list(labelled.values()))
verdict = safety_views.finetune_verdict(table)
if verdict:
    st.info(f"**Answer.** {verdict}")
paired = safety_views.finetune_paired_verdicts(labelled)
if paired:
    st.markdown("**Paired tests on the same generation prompts** (exact McNemar; a change is called a rise or fall "
                "when p < 0.05; 95% Newcombe intervals in points):\n" + "\n".join(f"- {line}" for line in paired))
common.show_table(table)
export_id = f"finetune_{config.preset}"
common.data_downloads(table, export_id, "comparison")
figures = safety_views.finetune_figures(labelled)
columns = st.columns(2)
for index, metric in enumerate(MAIN_METRICS):
    with columns[index % 2]:
        common.show_figure(figures[metric], export_id, metric)
with st.expander("More curves: training loss, SPF's removed share, weight distance, over-refusal"):
    columns = st.columns(2)
    for index, metric in enumerate(m for m in figures if m not in MAIN_METRICS):
        with columns[index % 2]:
            common.show_figure(figures[metric], export_id, metric)
common.show_figure(safety_views.finetune_category_figure(labelled), export_id, "asr_by_category")
histories = pd.concat([results.history.assign(arm=method) for method, results in labelled.items()], ignore_index=True)
common.data_downloads(histories, export_id, "history")

model_paths = {method: results.model_path for method, results in labelled.items() if results.model_path}
if model_paths:
    st.markdown("**How did the safety subspace change?** Analyse a fine-tuned model on the other pages:")
    for column, (method, path) in zip(st.columns(len(model_paths)), model_paths.items()):
        if column.button(f"Use the {method} model on Setup", key=f"ft.use.{method}", icon=":material/arrow_forward:"):
            common.set_choice("model", str(path))
            st.switch_page("pages/setup.py")

# ---- Safe LoRA (post-hoc) -------------------------------------------------------------------------------
st.header("4 · Safe LoRA (post-hoc)", divider="gray")
st.caption("Project a finished run's weight change onto the alignment subspace (Hsu et al. 2024, our reading): per "
           "linear module, V = W_aligned − W_before-alignment, dW = W_fine-tuned − W_aligned; where cos(dW, P dW) is "
           "below the threshold the module becomes W_aligned + P dW (P: the top-r left singular vectors of V), "
           "otherwise it keeps its fine-tuned weights. The defended model is a new folder; evaluate it on “Is the "
           "model safe?” or analyse it on Setup.")
if not model_paths:
    st.caption("No saved fine-tuned model among these runs.")
else:
    left, middle, right = st.columns(3, gap="large")
    with left:
        defended_arm = st.radio("Fine-tuned model", list(model_paths), format_func=lambda m: ARM_LABELS.get(m, m),
                                horizontal=True, key="widget.ft.sl.arm")
        before_alignment = st.text_input("Model before alignment", key="widget.ft.sl.base",
                                         value="default" if source == "default-aligned" else source,
                                         help="the alignment delta V is the aligned (starting) model minus this one")
    threshold = middle.number_input("Threshold: project a module when cos(dW, P dW) is below", min_value=-1.0,
                                    max_value=1.01, value=safe_lora.SafeLoraTask.threshold, step=0.05,
                                    key="widget.ft.sl.threshold", help="1.01 projects every module")
    rank = right.number_input("Alignment subspace rank r per module", min_value=1, max_value=4096,
                              value=safe_lora.SafeLoraTask.rank, key="widget.ft.sl.rank")
    try:
        defence = safe_lora.SafeLoraTask(finetuned=str(model_paths[defended_arm]), aligned=config.model,
                                         base=before_alignment.strip() or "default", threshold=float(threshold),
                                         rank=int(rank))
        defence_id = defence.run_id()
    except InputError as error:
        st.error(str(error))
        defence = None
    if defence is not None:
        if defence.base.source == defence.aligned.source:
            st.warning("The model before alignment is the aligned model itself: the alignment delta is zero, so every "
                       "projected module falls back to the aligned weights.")
        outcome = safe_lora.load_outcome(defence_id)
        defence_job = ui_jobs.job_panel(defence, what="Safe LoRA projection",
                                        label=f"Safe LoRA on the {defended_arm} model of {config.preset}",
                                        stored=outcome is not None, stored_text=None, button="Project (Safe LoRA)",
                                        run_id=defence_id)
        if outcome is not None:
            summary, modules = outcome
            st.success(f"Projected {summary['n_projected']} of {summary['n_modules']} modules (threshold "
                       f"{summary['threshold']:g}, rank {summary['rank']}). Defended model: `{summary['folder']}`")
            common.show_table(modules)
            common.data_downloads(modules, f"safe_lora_{defence_id}", "modules")
            if st.button("Use the defended model on Setup", key="ft.sl.use", icon=":material/arrow_forward:"):
                common.set_choice("model", summary["folder"])
                st.switch_page("pages/setup.py")

# ---- earlier runs ---------------------------------------------------------------------------------------
st.header("5 · Earlier runs", divider="gray")
runs = finetune.list_finetune_runs()
common.show_table(runs.rename(columns={"asr": "final ASR", "utility_nll": "final utility NLL"}))
finished = list(runs.loc[runs["status"] == "complete", "run_id"])
picked = st.multiselect("Compare runs (same axes)", finished, max_selections=4, key="widget.ft.compare")
if picked:
    chosen = {run_id: finetune.load_finetune_run(run_id) for run_id in picked}
    common.show_table(finetune.comparison_table(list(chosen.values())))
    compare = safety_views.finetune_figures(chosen, MAIN_METRICS)
    columns = st.columns(2)
    for index, (metric, figure) in enumerate(compare.items()):
        with columns[index % 2]:
            common.show_figure(figure, "finetune_compare", metric)
