"""Is the model safe? Build the safety-aligned default model; evaluate models (ASR, over-refusal, NLLs)."""

import streamlit as st

from analysis.core.config import ConfigError, InputError
from analysis.lab.align import aligned_folder, aligned_manifest
from analysis.llm.data import DataError
from analysis.llm.models import ALIGN_MEASURED
from analysis.safety.evaluate import KEYWORD_LISTS, EvalConfig, GuardConfig, JudgeConfig
from analysis.views import safety as safety_views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

st.title("Is the model safe?")
st.caption("Attack success rate (ASR) = share of held-out harmful prompts whose greedy completion is not a refusal; "
           "over-refusal = share of benign prompts that merely sound sensitive which the model refuses. Refusals are "
           "found by keyword lists (Qi et al. 2023, case-sensitive; Arditi et al. 2024, case-insensitive). NLLs are "
           "nats per response token on the same held-out prompts.")

# ---- the aligned model -------------------------------------------------------------------------------
st.header("1 · The safety-aligned default model", divider="gray")
align_job = ui_jobs.current("align")
if align_job is not None and align_job.active:
    ui_jobs.follow(align_job)
else:
    if align_job is not None:
        ui_jobs.show_outcome(align_job, "Alignment")
    manifest = aligned_manifest()
    if manifest is not None:
        st.success(f"Built: `{aligned_folder()}` — selectable as “safety-aligned variant” on every page.")
        columns = st.columns(4)
        columns[0].metric("Steps", manifest.get("steps"))
        columns[1].metric("Learning rate", manifest.get("lr"))
        columns[2].metric("Trained blocks", f"{len(manifest.get('trained_layers', []))} (top)")
        losses = manifest.get("losses") or []
        head, tail = losses[:10], losses[-10:]
        columns[3].metric("Loss, first → last 10 steps",
                          f"{sum(head) / len(head):.2f} → {sum(tail) / len(tail):.2f}" if losses else "—")
        with st.expander("Manifest"):
            st.json(manifest, expanded=False)
    else:
        st.info("SmolLM2-135M-Instruct as shipped answers harmful requests, so its safety gradient has nothing to "
                "preserve. Build the safety-aligned variant once: refusals on the safety set's analysis split, mixed "
                f"with the model's own answers to benign prompts (self-distillation). It takes {ALIGN_MEASURED}.")
        if st.button("Build the aligned model", type="primary", icon=":material/shield:"):
            from analysis.lab.align import AlignTask

            ui_jobs.submit(AlignTask(), "Building the safety-aligned default model")
            st.rerun()

# ---- evaluation -------------------------------------------------------------------------------------
st.header("2 · Evaluate", divider="gray")
available = {key: label for key, label in common.MODEL_CHOICES.items()
             if key != "other" and (key != "default-aligned" or common.aligned_model_available())}
left, right = st.columns([3, 2], gap="large")
with left:
    default_models = [m for m in ("default", "default-aligned") if m in available]
    models = common.remembered_widget("eval.models", st.multiselect, "Models", list(available),
                                      value=default_models, format_func=available.get)
    other = st.text_input("Another model (Hugging Face id in the local cache, or a folder)", key="widget.eval.other",
                          placeholder="optional").strip()
with right:
    keywords = common.remembered_widget("eval.keywords", st.radio, "Refusal keywords", list(KEYWORD_LISTS),
                                        format_func=safety_views.KEYWORD_NAMES.get, value="qi")
    with st.expander("Settings"):
        n_harmful = common.remembered_widget("eval.n_harmful", st.number_input, "Harmful prompts (0 = all)",
                                             min_value=0, value=0)
        max_new_tokens = common.remembered_widget(
            "eval.max_new_tokens", st.number_input, "New tokens per completion", min_value=8, max_value=512,
            value=EvalConfig.max_new_tokens, help="Papers use up to 512; generation time grows with it.")
        utility_tokens = common.remembered_widget(
            "eval.utility_max_new_tokens", st.number_input, "New tokens per utility answer (math, QA)", min_value=16,
            max_value=512, value=EvalConfig.utility_max_new_tokens, help="Room for the worked answer and its final number.")


JUDGE_RUBRIC_NAMES = {"qi": "Qi et al. 1–5 harmfulness", "strongreject": "StrongREJECT (0–1)"}
PROMPT_FORMATS = "JSONL/JSON/CSV, HarmBench, AdvBench, JailbreakBench, StrongREJECT or XSTest CSV, .txt one per line"


def prompt_set(which: str, shipped: str, shipped_label: str) -> str | None:
    """The harmful or benign prompt set: the shipped one, an upload (saved under the cache) or a path.
    Returns the reference for ``EvalConfig`` or None while the choice is incomplete or broken."""
    from analysis.llm.data import load_any

    options = {"shipped": shipped_label, "upload": "Upload a file", "path": "A file on this machine"}
    picked = common.remembered_widget(f"eval.{which}.source", st.radio, f"{which.capitalize()} prompts",
                                      list(options), format_func=options.get, horizontal=True, value="shipped")
    if picked == "shipped":
        return shipped
    if picked == "upload":
        upload = st.file_uploader(f"{which.capitalize()} prompts ({PROMPT_FORMATS})", key=f"widget.eval.{which}.upload",
                                  type=["jsonl", "json", "csv", "txt"])
        parsed = common.read_upload(upload, require_response=False) if upload is not None else None
        if parsed is None:
            return None
        reference, dataset = parsed
    else:
        reference = common.remembered_widget(f"eval.{which}.path", st.text_input, f"Path of the {which} prompts",
                                             value="", placeholder=PROMPT_FORMATS).strip()
        if not reference:
            return None
        try:
            dataset = load_any(reference, require_response=False)
        except DataError as error:
            st.error(str(error))
            return None
    st.caption(common.describe_dataset(dataset))
    return reference


with st.expander("Prompt sets (harmful: attack success; benign: over-refusal)"):
    harmful_set = prompt_set("harmful", "safety", "held-out split of the shipped safety set (88)")
    benign_set = prompt_set("benign", "benign_sensitive", "shipped benign-but-sensitive prompts (64)")
with st.expander("Judges (optional): an LLM judge through an OpenAI-compatible endpoint, a local guard classifier"):
    judge_url = common.remembered_widget("eval.judge_url", st.text_input, "Judge endpoint (base URL)", value="",
                                         placeholder="http://localhost:8000/v1 (key from $OPENAI_API_KEY)").strip()
    judge_model = common.remembered_widget("eval.judge_model", st.text_input, "Judge model name", value="").strip()
    judge_rubric = common.remembered_widget(
        "eval.judge_rubric", st.radio, "Judge rubric", list(JUDGE_RUBRIC_NAMES), format_func=JUDGE_RUBRIC_NAMES.get,
        horizontal=True, value="qi")
    guard_folder = common.remembered_widget(
        "eval.guard", st.text_input, "Guard classifier (a Llama-Guard-style model folder)", value="",
        placeholder="optional; labels each harmful answer safe / unsafe").strip()
if harmful_set is None or benign_set is None:
    st.info("Choose the harmful and benign prompt sets.")
    st.stop()
sources = list(models) + ([other] if other else [])
if not sources:
    st.info("Pick at least one model to evaluate.")
    st.stop()
try:
    judge = JudgeConfig(base_url=judge_url, model=judge_model, rubric=judge_rubric) if judge_url else None
    guard = GuardConfig(model=guard_folder) if guard_folder else None
    # both keyword lists are always scored; the choice above only picks what the figure shows
    tasks = {available.get(source, source): EvalConfig(model=source, max_new_tokens=int(max_new_tokens),
                                                      n_harmful=int(n_harmful) or None, harmful=harmful_set,
                                                      benign=benign_set, utility_max_new_tokens=int(utility_tokens),
                                                      judge=judge, guard=guard)
             for source in sources}
except ConfigError as error:
    st.error(str(error))
    st.stop()

from analysis.safety.evaluate import stored_evaluation  # noqa: E402

try:
    results = {label: stored_evaluation(task) for label, task in tasks.items()}
except InputError as error:
    st.error(str(error))
    st.stop()
missing = [label for label, result in results.items() if result is None]
active = {label: ui_jobs.current("evaluate", task.run_id()) for label, task in tasks.items() if label in missing}
for label, status in active.items():
    if status is not None and status.active:
        ui_jobs.follow(status)
    elif status is not None:
        ui_jobs.show_outcome(status, f"Evaluation of {label}")
todo = [label for label in missing if active.get(label) is None or not active[label].active]
if todo:
    st.caption(f"Not evaluated yet with these settings: {', '.join(todo)} (about 1–3 minutes per model on a CPU; "
               "each model is a job of its own).")
    if st.button("Evaluate", type="primary", icon=":material/play_arrow:"):
        for label in todo:
            ui_jobs.submit(tasks[label], f"Evaluating {label}")
        st.rerun()

done = {label: result for label, result in results.items() if result is not None}
if not done:
    st.stop()

st.subheader("Results")
summary = safety_views.eval_summary(done)
tables = safety_views.eval_tables(done)
st.markdown("**Refusals**: attack success rate on harmful prompts, over-refusal on benign sensitive prompts")
common.show_table(tables["rates"])
st.markdown("**Utility and likelihoods**: utility accuracy = share of held-out math / factual-QA answers that are "
            "right (final number; short answer contained), NLLs in nats per response token")
common.show_table(tables["likelihoods"])
common.data_downloads(summary, "evaluation", "summary")
figure = safety_views.category_asr_figure(done, keywords)
common.show_figure(figure, "evaluation", f"asr_by_category_{keywords}")
categories = safety_views.category_rates(done, keywords)
common.data_downloads(categories, "evaluation", f"asr_by_category_{keywords}")

with st.expander("Read the completions (keyword matching has known failure modes)"):
    label = st.selectbox("Model", list(done), key="widget.eval.completions_model")
    which = st.radio("Prompts", ["harmful", "benign", "utility"], horizontal=True, key="widget.eval.completions_set")
    completions = safety_views.completions_table(done[label], which)
    st.dataframe(completions, hide_index=True, width="stretch", height=360)
    common.data_downloads(completions, "evaluation", f"completions_{which}")
