"""Setup — what do I analyse? Model, datasets, modules, sizes; start a collection and watch it live."""

import re
from pathlib import Path

import streamlit as st

from analysis.core import jobs
from analysis.core.config import InputError, ModelConfig
from analysis.core.options import default
from analysis.engine.collect_task import CURVE_AUTO_LAYERS, CollectionConfig
from analysis.engine.results import CollectionStore
from analysis.llm.anatomy import ALL_KINDS, SelectionError, select_modules
from analysis.llm.data import load_shipped
from analysis.llm.models import ModelLoadError, summarize
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

SAFETY_SETS = {"safety": "safety: harmful requests + refusals", "harmful_prefix": "harmful_prefix: attack targets",
               "identity_shift": "identity_shift: AOA persona", "upload": "Upload a file…"}
UTILITY_SETS = {"utility": "utility: benign tasks + answers", "benign_sensitive": "benign_sensitive: borderline benign",
                "upload": "Upload a file…"}
ALL_SPLITS = "(all)"
CURVE_HELP = (f"'auto' (up to {CURVE_AUTO_LAYERS} layers spread evenly over the selected ones, first and last included), "
              "'all', 'none' or a layer list such as '0,10'")
FORM_LABELS = {"n_safety": "Safety samples n", "n_utility": "Utility samples n", "max_length": "Sequence length",
               "top_k": "Subspace dimension k", "batch_size": "Batch size", "curve_boot": "Bootstrap subsets per n",
               "n_boot": "Bootstrap replicates", "n_perm": "Permutations",
               "curve_layers": "Overlap-vs-n curve layers", "gram_route": "Gram route"}


def readable(error: Exception) -> str:
    """An error as the form speaks: uploads by their file name, settings by their field label."""
    text = common.readable_error(error)
    for name, label in FORM_LABELS.items():
        text = re.sub(rf"\b{name}\b", f"'{label}'", text)
    return text


st.title("What do I analyse?")
st.caption("Pick a model, a safety set and a utility set, and which linear modules to look at. "
           "Collecting computes exact per-sample gradients and stores the results; the other pages read them.")


# ---- model -----------------------------------------------------------------------------------------
st.header("1 · Model", divider="gray")
model_column, summary_column = st.columns([2, 3], gap="large")
def remember_model() -> None:
    """Runs before the rerun (on_change), so the sidebar, drawn before this page, already shows the new model."""
    picked = st.session_state["widget.model_kind"]
    other = st.session_state.get("widget.model_other", "").strip()
    if picked != "other" or other:  # this session only: saved for new sessions once it has loaded (below)
        common.set_choice("model", picked if picked != "other" else other, persist=False)


with model_column:
    remembered = common.choice("model")
    kind = remembered if remembered in common.MODEL_CHOICES else "other"
    picked = st.radio("Model", list(common.MODEL_CHOICES), index=list(common.MODEL_CHOICES).index(kind),
                      format_func=common.MODEL_CHOICES.get, key="widget.model_kind", on_change=remember_model)
    source, allow_pickle, trust_remote_code = picked, False, False
    if picked == "default-aligned" and not common.aligned_model_available():
        st.warning("The safety-aligned variant has not been built yet. The seeds' claims are about aligned models, "
                   "so build it once here (or with `python -m analysis align`); its details are on the page "
                   "\"Is the model safe?\".")
        ui_jobs.aligned_model_panel("Self-distilled refusals and benign answers, then training; its progress shows "
                                    "the time left.")
        st.stop()
    if picked == "other":
        source = st.text_input("Hugging Face id or local checkpoint folder",
                               value=remembered if kind == "other" else "", placeholder="HuggingFaceTB/SmolLM2-360M-Instruct",
                               key="widget.model_other", on_change=remember_model).strip()
        allow_pickle = st.checkbox("Allow pickle (.bin) weights — only for a model you trust", key="widget.pickle")
        trust_remote_code = st.checkbox("Trust remote code — only for a model you trust", key="widget.remote")
        if not source:
            st.info("Type a hub id (must be in the local Hugging Face cache on an offline machine) or a folder.")
            st.stop()
    if source != remembered:
        common.set_choice("model", source, persist=False)

try:
    loaded = common.load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
except ModelLoadError as error:
    st.error(str(error))
    st.stop()
common.remember_loaded_model(source)  # a model that failed to load is never what a new session opens on
summary = summarize(loaded.model, loaded.tokenizer)
with summary_column:
    st.subheader(loaded.name)
    metrics = st.columns(4)
    metrics[0].metric("Family", summary.family)
    metrics[1].metric("Parameters", f"{summary.n_parameters / 1e6:.1f} M" if summary.n_parameters >= 1e5
                      else f"{summary.n_parameters:,}")
    metrics[2].metric("Layers", summary.n_layers)
    metrics[3].metric("Linear modules", len(summary.modules))
    if not summary.has_chat_template:
        st.caption("No chat template: a plain '### User / ### Assistant' format is used.")
    with st.expander(f"All {len(summary.modules)} linear modules"):
        st.dataframe([{"module": m.name, "label": m.label, "layer": m.layer, "kind": m.kind,
                       "shape (d_out × d_in)": f"{m.d_out} × {m.d_in}"} for m in summary.modules],
                     hide_index=True, width="stretch", height=260)


# ---- datasets -------------------------------------------------------------------------------------
def dataset_picker(which: str, options: dict[str, str], default_split: str):
    """Shipped set or an upload; returns (dataset reference for the config, split or None, Dataset)."""
    picked = common.remembered_widget(f"{which}.set", st.selectbox, f"{which.capitalize()} set", list(options),
                                      format_func=options.get)
    if picked == "upload":
        upload = st.file_uploader(f"{which.capitalize()} file (JSONL, JSON, CSV, AdvBench CSV)",
                                  type=["jsonl", "json", "csv"], key=f"widget.{which}.upload")
        if upload is None:
            st.info("Each row needs a prompt and a response (the text that carries the loss).")
            return None, None, None
        parsed = common.read_upload(upload)
        if parsed is None:
            return None, None, None
        reference, dataset = parsed
    else:
        dataset, reference = load_shipped(picked), picked
    splits = [ALL_SPLITS] + sorted(s for s in dataset.splits() if s != common.NO_LABEL)  # rows without a split: only in (all)
    remembered = common.choice(f"{which}.split.{picked}", default_split)
    split = st.selectbox("Split", splits, index=splits.index(remembered) if remembered in splits else 0,
                         key=f"widget.{which}.split.{picked}")
    if split != remembered:
        common.set_choice(f"{which}.split.{picked}", split)
    chosen = dataset if split == ALL_SPLITS else dataset.split(split)
    st.caption(common.describe_dataset(chosen))
    return reference, None if split == ALL_SPLITS else split, chosen


st.header("2 · Data", divider="gray")
safety_column, utility_column = st.columns(2, gap="large")
with safety_column:
    safety_ref, safety_split, safety_set = dataset_picker("safety", SAFETY_SETS, "analysis")
with utility_column:
    utility_ref, utility_split, utility_set = dataset_picker("utility", UTILITY_SETS, "analysis")

# ---- modules and sizes ------------------------------------------------------------------------------
st.header("3 · Modules and sizes", divider="gray")
kinds_present = [k for k in ALL_KINDS if any(m.kind == k for m in summary.modules)]
spread = sorted({round(i * (summary.n_layers - 1) / 3) for i in range(4)}) if summary.n_layers > 4 else []
default_layers = ",".join(map(str, spread)) if spread else "all"
left, middle, right = st.columns(3, gap="large")
with left:
    layers = common.remembered_widget(f"layers.{source}", st.text_input, "Layers", value=default_layers,
                                      help="'all', or a list/ranges like '0-3,7'; negative counts from the end")
    kinds = common.remembered_widget(f"kinds.{source}", st.multiselect, "Module kinds", kinds_present,
                                     value=kinds_present, wrap=True)  # wrap: all chips visible in a narrow column
    try:
        if not kinds:
            raise SelectionError("no module kind chosen: pick at least one")
        if not layers.strip():  # the engine reads "" as all layers: make the user say so
            everything = select_modules(summary.modules, "all", kinds)
            raise SelectionError(f"The Layers field is empty. Type 'all' to analyse all {summary.n_layers} layers "
                                 f"({len(everything)} modules: a long collection), or a list such as "
                                 f"'{default_layers if default_layers != 'all' else '0,1'}'.")
        selected = select_modules(summary.modules, layers, kinds)
        st.caption(f"{len(selected)} modules selected: {', '.join(m.label for m in selected[:8])}"
                   + ("…" if len(selected) > 8 else ""))
    except SelectionError as error:
        st.error(str(error))
        selected = []
with middle:
    n_safety = common.remembered_widget("n_safety", st.number_input, "Safety samples n", min_value=1,
                                        value=default(CollectionConfig, "n_safety"))
    n_utility = common.remembered_widget("n_utility", st.number_input, "Utility samples n", min_value=1,
                                         value=default(CollectionConfig, "n_utility"))
    max_length = common.remembered_widget("max_length", st.number_input, "Sequence length (tokens)",
                                          min_value=16, max_value=4096, value=default(CollectionConfig, "max_length"), step=16)
    size_problems = [
        f"{label} = {n}, but the {which} set ({Path(chosen.source).name or chosen.name}"
        f"{f', split {split}' if split else ''}) has only {len(chosen)} examples: lower it to at most {len(chosen)}."
        for label, which, n, chosen, split in (("Safety samples n", "safety", n_safety, safety_set, safety_split),
                                               ("Utility samples n", "utility", n_utility, utility_set, utility_split))
        if chosen is not None and n > len(chosen)]
    for problem in size_problems:
        st.error(problem)
with right:
    top_k = common.remembered_widget("top_k", st.number_input, "Subspace dimension k", min_value=1, max_value=256,
                                     value=default(CollectionConfig, "top_k"))
    seed = common.remembered_widget("seed", st.number_input, "Seed", min_value=0, max_value=2**31 - 1,
                                    value=default(CollectionConfig, "seed"))
    with st.expander("Advanced"):
        batch_size = common.remembered_widget("batch_size", st.number_input, "Batch size", min_value=1,
                                              max_value=256, value=default(CollectionConfig, "batch_size"))
        curve_layers = common.remembered_widget("curve_layers", st.text_input, "Overlap-vs-n curve layers",
                                                value=default(CollectionConfig, "curve_layers"), help=CURVE_HELP)
        curve_boot = common.remembered_widget("curve_boot", st.number_input, "Bootstrap subsets per n",
                                              min_value=1, max_value=200, value=default(CollectionConfig, "curve_boot"))
        n_boot = common.remembered_widget("n_boot", st.number_input, "Bootstrap replicates (intervals)",
                                          min_value=0, max_value=5000, value=default(CollectionConfig, "n_boot"),
                                          help="95% percentile intervals of every metric, resampling prompts; "
                                               "0: none (seeded by Seed)")
        n_perm = common.remembered_widget("n_perm", st.number_input, "Permutations (null model)", min_value=0,
                                          max_value=5000, value=default(CollectionConfig, "n_perm"),
                                          help="p-values of the claims: safety and utility prompts pooled and "
                                               "split at random; 0: none")
        gram_route = common.remembered_widget("gram_route", st.selectbox, "Gram route (both exact)",
                                              ["auto", "ghost", "dense"])
        modules_per_pass = common.remembered_widget(
            "modules_per_pass", st.number_input, "Modules per pass (0: all in one)", min_value=0, value=0,
            help="capture only this many modules per forward+backward pass, analyse and release them, then the "
                 "next ones: less memory, one more pass each, identical results")
        common.remembered_widget("device", st.selectbox, "Compute device (every job)", common.devices(),
                                 help="where collections, evaluations and fine-tuning run; one job at a time per device")

# ---- collect ----------------------------------------------------------------------------------------
st.header("4 · Collect", divider="gray")


def show_plan(config, model) -> None:
    """The planner's prediction for ``config`` against the memory free on the job device, and the modules
    per pass that fit when it does not."""
    from analysis.engine.planner import (
        PlanError,
        architecture,
        available_memory,
        fit_modules_per_pass,
        plan_collection,
        size_text,
    )

    device = common.choice("device", "cpu")
    arch = architecture(config.model, model=model)
    plan = plan_collection(config, arch, device=device)
    free = available_memory(device)
    st.caption(f"Predicted: memory peak ~{size_text(plan.peak_bytes)} ({size_text(free)} free on {device}), "
               f"~{size_text(plan.disk_bytes)} of temporary factor files, ~{plan.seconds / 60:.1f} min of "
               f"forward+backward in {plan.passes} pass(es).")
    if plan.peak_bytes > free:
        try:
            fit = fit_modules_per_pass(config, arch, free, device=device)
            st.warning(f"This may not fit the free memory: set Advanced → Modules per pass to {fit} (or fewer), "
                       "or lower the batch size / sequence length.", icon=":material/memory:")
        except PlanError as error:
            st.warning(f"This may not fit the free memory: {error}", icon=":material/memory:")
config = stored_id = None
if safety_ref and utility_ref and selected and not size_problems:
    from analysis.engine.collect_task import CollectionConfig

    try:
        config = CollectionConfig(
            model=ModelConfig(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code), safety=safety_ref, utility=utility_ref,
            safety_split=safety_split, utility_split=utility_split, n_safety=int(n_safety), n_utility=int(n_utility),
            layers=layers, kinds=",".join(kinds), max_length=int(max_length), batch_size=int(batch_size),
            top_k=int(top_k), seed=int(seed), gram_route=gram_route, curve_layers=curve_layers,
            curve_boot=int(curve_boot), n_boot=int(n_boot), n_perm=int(n_perm),
            modules_per_pass=int(modules_per_pass),
        )
        stored_id = config.run_id()
    except InputError as error:
        st.error(readable(error))
        config = None
if config is not None:
    show_plan(config, loaded.model)
elif not size_problems:
    st.info("Choose a safety set, a utility set and at least one module to collect.")


complete = stored_id is not None and CollectionStore().status(stored_id) == "complete"
if complete and common.choice("run_id") != stored_id:
    common.set_choice("run_id", stored_id)
    st.rerun()
if config is not None:
    others = [s for s in jobs.list_jobs(kind="collect", active_only=True) if s.run_id != stored_id]
    if others:
        st.caption(f"Another collection is {others[0].state}: {common.plain(others[0].label)} (the sidebar follows "
                   "it); collecting these settings queues a job of their own.")
    ui_jobs.job_panel(config, what="Collection", label=f"{source}: {config.n_safety} safety + {config.n_utility} "
                      f"utility, {len(selected)} modules", stored=complete, run_id=stored_id, button="Collect",
                      stored_text=f"These settings were collected before: run `{stored_id}` is loaded and shown on "
                                  "the other pages.", live_view=common.show_live_collection)

run = common.active_run()
if run is not None and complete and run.run_id == stored_id:
    st.markdown("#### First answers")
    truncated = common.view(run, "truncation_notice")
    if truncated:
        st.caption(f":material/content_cut: {truncated}")
    st.markdown(f"**Is safety low-rank?** {common.view(run, 'low_rank_answer', 0.9)}")
    st.markdown(f"**Do safety and utility fight?** {common.view(run, 'conflict_answer')}")
    st.page_link("pages/spectra.py", label="See the spectra", icon=":material/show_chart:")
