"""Which of my data is risky? Per-example screening of a fine-tuning dataset from per-sample gradients."""

import streamlit as st

from analysis.core.config import InputError
from analysis.core.options import default
from analysis.lab import screen as lab_screen
from analysis.lab import screen_validate as lab_validate
from analysis.llm.data import load_shipped
from analysis.views import screen as views
from ui import common
from ui import jobs as ui_jobs

common.run_inside_app()

st.title("Which of my data is risky?")
st.caption("Benign fine-tuning data can erode safety (Qi et al. 2023); the examples whose gradients look like harmful "
           "compliance and unlike refusal do the most damage (He et al. 2024). Each example's gradient g over the "
           "selected weights is compared, exactly and per module, with the mean gradients of harmful prompts answered "
           "compliantly (“Sure, here is …”) and with refusals on the same prompts, and with the top-k safety subspace; "
           "a cheap representation score is the baseline.")

# ---- 1 · data -------------------------------------------------------------------------------------------
st.header("1 · Data", divider="gray")
SHIPPED = {"utility": "utility.jsonl: benign tasks with reference answers (330)",
           "benign_sensitive": "benign_sensitive.jsonl: harmless prompts that look sensitive (64)",
           "upload": "Upload my file (Alpaca, Dolly, chat messages JSONL, prompt/response JSONL / JSON / CSV)"}
source = common.remembered_widget("screen.data", st.selectbox, "Dataset", list(SHIPPED), format_func=SHIPPED.get,
                                  value="utility")
if source == "upload":
    upload = st.file_uploader("Fine-tuning data", type=["jsonl", "json", "csv"], key="widget.screen.upload")
    if upload is None:
        st.info("Each row needs a prompt and the answer you would fine-tune on: Alpaca (instruction, input, output), "
                "Dolly (instruction, context, response), chat `messages`, or `prompt` / `response`.")
        st.stop()
    parsed = common.read_upload(upload)
    if parsed is None:
        st.stop()
    data, dataset = parsed
else:
    data, dataset = source, load_shipped(source)
st.caption(common.describe_dataset(dataset))

left, middle, right = st.columns(3, gap="large")
with left:
    models = {key: label for key, label in common.MODEL_CHOICES.items() if key != "other"}
    if common.choice("screen.model", common.choice("model")) not in models:  # e.g. a hub model chosen on Setup
        common.set_choice("screen.model", "default")
    model = common.remembered_widget("screen.model", st.selectbox, "Aligned model", list(models),
                                     format_func=models.get, value=common.choice("model"))
with middle:
    n_examples = st.number_input("Examples to score (0: all)", min_value=0, max_value=100_000, value=0,
                                 key="widget.screen.n")
    n_anchors = common.setting_input(lab_screen.ScreenTask, "n_anchors", "Anchor prompts (harmful)", min_value=2,
                                     max_value=154)
with right:
    k = common.setting_input(lab_screen.ScreenTask, "k", "Safety subspace size k (per module)", min_value=1,
                             max_value=64)
    kinds = st.text_input("Module kinds", value="all", key="widget.screen.kinds",
                          help="e.g. 'q,v,down'; 'all' scores every linear module of the blocks")
    max_length = common.setting_input(lab_screen.ScreenTask, "max_length", "Tokens per example (longer: truncated)",
                                      min_value=16, max_value=4096)

with st.expander("Anchors: the harmful prompts the gradients are compared with"):
    ANCHORS = {"safety": "safety.jsonl (analysis split): harmful prompts with refusals; compliance = “Sure, here is …”",
               "harmful_prefix": "harmful_prefix.jsonl: AdvBench-style prompts with “Sure, here is …”; refusal made",
               "upload": "Upload my own harmful prompts (with refusals or with compliant answers)"}
    anchor_source = st.selectbox("Anchor set", list(ANCHORS), format_func=ANCHORS.get, key="widget.screen.anchors")
    anchors, anchor_responses = anchor_source, {"safety": "refusal", "harmful_prefix": "compliance"}.get(anchor_source)
    if anchor_source == "upload":
        anchor_upload = st.file_uploader("Anchor prompts", type=["jsonl", "json", "csv"], key="widget.screen.anchor_upload")
        anchor_responses = st.radio("Their responses are", lab_screen.ANCHOR_RESPONSES, horizontal=True,
                                    key="widget.screen.anchor_responses",
                                    help="the other answer is made: a fixed refusal, or “Sure, here is how to do that”")
        parsed_anchors = common.read_upload(anchor_upload, require_response=False) if anchor_upload else None
        if parsed_anchors is None:
            st.info("Without an anchor file the shipped safety.jsonl prompts are used.")
            anchors, anchor_responses = "safety", "refusal"
        else:
            anchors = parsed_anchors[0]

try:
    task = lab_screen.ScreenTask(data=data, model=model, n_examples=int(n_examples) or None, n_anchors=int(n_anchors),
                                 k=int(k), kinds=kinds, anchors=anchors, anchor_responses=anchor_responses,
                                 max_length=int(max_length))
    run_id = task.run_id()
except InputError as error:
    st.error(str(error))
    st.stop()

# ---- 2 · the screening (a job) ---------------------------------------------------------------------------
st.header("2 · Scores", divider="gray")
stored = lab_screen.load_screen(task)
job = ui_jobs.job_panel(task, what="The screening", label=f"screen: {source if source != 'upload' else dataset.name}",
                        stored=stored is not None, stored_text=None, button="Screen", run_id=run_id,
                        todo_text="Not screened yet. The job takes the two anchor gradients, then one forward + "
                                  "backward per batch of examples.")
if stored is None or (job is not None and job.active):
    st.stop()

summary, rows, anchors = stored.summary, stored.rows, stored.anchors
export_id = f"screen_{run_id}"
st.info(f"**Answer.** {views.screen_answer(summary, rows, anchors)}")
score = st.radio("Rank by", list(views.SCORE_LABELS), format_func=views.SCORE_LABELS.get, horizontal=True,
                 key="widget.screen.score")
categories = sorted(rows["category"].fillna("(none)").unique())
filters = st.columns([2, 3])
with filters[0]:
    chosen = st.multiselect("Categories", categories, key="widget.screen.categories")
with filters[1]:
    search = st.text_input("Search prompt / answer", key="widget.screen.search")
ranked = views.ranked_table(rows, score, chosen, search)
st.caption(f"{len(ranked)} of {len(rows)} examples; risky end of “{views.SCORE_LABELS[score]}”: "
           f"{lab_screen.SCORES[score][1]}. n = {summary['n_examples']}, {summary['n_modules']} modules, "
           f"k = {summary['k']}, {summary['n_anchors']} anchor prompts.")
common.show_table(ranked.drop(columns=["index"]), height=360)

common.show_figure(views.histograms_figure(rows, anchors, subtitle=f"{summary['data']} · {summary['model']}"),
                   export_id, "histograms")
left, right = st.columns(2)
with left:
    common.show_figure(views.agreement_figure(summary["spearman"]), export_id, "agreement")
with right:
    top_k = st.number_input("Top-k for the overlap", min_value=1, max_value=len(rows), value=min(10, len(rows)),
                            key="widget.screen.overlap_k")
    common.show_table(views.top_agreement(rows, int(top_k)))

# ---- 3 · one example, module by module ----------------------------------------------------------------------
st.header("3 · One example, module by module", divider="gray")
labels = {int(r.index): f"#{r.rank} · {r.id} · {r.prompt[:70]}" for r in ranked.head(200).itertuples()}
if labels:
    picked = st.selectbox("Example (the 200 best ranked of the table)", list(labels), format_func=labels.get,
                          key="widget.screen.example")
    frame = views.module_frame(stored.arrays, stored.modules, int(picked))
    value = st.radio("Per module", ["contribution to gradient matching", "cos compliance (module)",
                                    "cos refusal (module)", "safety share (module)", "grad norm share"],
                     horizontal=True, key="widget.screen.module_value")
    common.show_figure(views.module_figure(frame, value, subtitle=labels[picked]), export_id, f"modules_{picked}")
    common.data_downloads(frame, export_id, f"modules_{picked}")

# ---- 4 · export ------------------------------------------------------------------------------------------------
st.header("4 · Export", divider="gray")
fmt = views.input_format(rows)
k_export = st.number_input("k", min_value=1, max_value=len(rows), value=min(100, len(rows)), key="widget.screen.export_k")
st.caption(f"JSON Lines in the input's own format ({fmt}), ranked by “{views.SCORE_LABELS[score]}”; the files load "
           "back as training data (Fine-tune page, or `train_data` of a fine-tuning config).")
columns = st.columns(3)
for column, which in zip(columns, lab_screen.SUBSETS):
    positions = lab_screen.select_subset(rows[score], which, int(k_export), risky=lab_screen.SCORES[score][1])
    column.download_button(f"{which}-{int(k_export)} (.jsonl)", views.export_subset(rows, positions),
                           file_name=f"{dataset.name}_{score}_{which}{int(k_export)}.jsonl", mime="application/jsonl",
                           key=f"widget.screen.export_{which}")
if chosen or search.strip():
    st.download_button(f"the {len(ranked)} filtered examples (.jsonl)", views.export_subset(rows, ranked["index"]),
                       file_name=f"{dataset.name}_filtered.jsonl", mime="application/jsonl",
                       key="widget.screen.export_filtered")
common.data_downloads(ranked, export_id, "scores")

# ---- 5 · validation (a job) ------------------------------------------------------------------------------
st.header("5 · Does the ranking predict harm?", divider="gray")
st.caption("Fine-tune the aligned model on the k riskiest, the k least risky and k random examples (same preset, "
           "steps, learning rate and seeds), evaluate every model on the same held-out prompts, and compare ASR with "
           "95% Wilson intervals and exact McNemar tests on the paired prompts. Costs 3 fine-tuning runs and 3 "
           "evaluations per seed.")
cols = st.columns(3)
with cols[0]:
    v_k = st.number_input("k per arm", min_value=1, max_value=len(rows),
                          value=min(default(lab_validate.ValidateScreenTask, "k"), len(rows)),
                          key="widget.screen.validate_k")
    v_seeds = st.multiselect("Seeds", [0, 1, 2, 3], default=list(default(lab_validate.ValidateScreenTask, "seeds")),
                             key="widget.screen.validate_seeds")
with cols[1]:
    v_steps = st.number_input("Max fine-tuning steps (0: the preset's)", min_value=0, max_value=1000, value=0,
                              key="widget.screen.validate_steps",
                              help="preset harmful-100: 5 epochs of batch 10, lr 5e-5 (50 steps for k = 100)")
    v_utility = st.toggle("Score utility answers too", value=default(lab_validate.ValidateScreenTask, "utility_accuracy"),
                          key="widget.screen.validate_utility")
with cols[2]:
    v_harmful = common.setting_input(lab_validate.ValidateScreenTask, "n_harmful", "Held-out harmful prompts",
                                     min_value=1, max_value=88, help="of the 88 held-out harmful prompts")
    v_benign = common.setting_input(lab_validate.ValidateScreenTask, "n_benign", "Benign-sensitive prompts",
                                    min_value=1, max_value=64, help="of the 64 benign-sensitive prompts")
try:
    validation = lab_validate.ValidateScreenTask(screen=task, score=score, k=int(v_k), seeds=tuple(v_seeds or [0]),
                                                 overrides={"max_steps": int(v_steps)} if v_steps else None,
                                                 n_harmful=int(v_harmful), n_benign=int(v_benign),
                                                 utility_accuracy=bool(v_utility))
    validation_id = validation.run_id()
except InputError as error:
    st.error(str(error))
    st.stop()
v_stored = lab_validate.load_validation(validation)
v_job = ui_jobs.job_panel(validation, what="The validation", label=f"validate: {score}, k = {int(v_k)}",
                          stored=v_stored is not None, stored_text=None, button="Validate the ranking",
                          live_view=lambda live: common.show_table(views.validation_frame(live.get("rows", []))),
                          run_id=validation_id,
                          todo_text="Fine-tunes the model on the top, bottom and random k examples (same steps, lr "
                                    "and seeds) and evaluates each on the same held-out prompts.")
if v_stored is None or (v_job is not None and v_job.active):
    st.stop()
for verdict in v_stored["verdicts"]:
    (st.success if verdict["significant"] else st.warning if verdict.get("opposite") else st.info)(verdict["words"])
common.show_figure(views.validation_figure(v_stored["rows"], subtitle=f"{score}, k = {int(v_k)}"), export_id,
                   f"validation_{validation_id}")
common.show_table(views.validation_frame(v_stored["rows"]))
