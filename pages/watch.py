"""Watch a training run: the safety geometry SafetyGeometryCallback records from a researcher's own Trainer."""

from pathlib import Path

import streamlit as st

from analysis.views import watch as views
from ui import common

common.run_inside_app()

st.title("Watch a training run")
st.caption("Add one line to your own `transformers` Trainer or TRL script and follow, live, how each update "
           "lines up with the safety gradient: cosine, the share of the update in the top-k safety subspace, "
           "the first-order change of the refusal loss, the drift of the subspace and the refusal NLL.")
with st.expander("How to record a run"):
    st.code("from analysis.lab.watch import SafetyGeometryCallback\n"
            "trainer.add_callback(SafetyGeometryCallback(tokenizer, interval=10))  # mode='spf' to protect\n"
            "trainer.train()   # writes cache/watch/<output_dir>-<time>/, shown here while it trains",
            language="python")

runs = views.list_runs()
options = list(runs["folder"]) if not runs.empty else []
labels = {row.folder: f"{row.run_id} · {row.status} · {row.mode} · step {row.last_step}" for row in runs.itertuples()}
typed_before = str(st.session_state.get("widget.watch.path", "")).strip()
left, right = st.columns([3, 2])
with left:
    chosen = st.selectbox("Run", options, format_func=lambda f: labels.get(f, f), key="widget.watch.run",
                          placeholder="no recorded run yet", index=0 if options else None, disabled=bool(typed_before),
                          help="clear the folder field to pick a run here" if typed_before else None)
with right:
    typed = st.text_input("…or a run folder written by a script", key="widget.watch.path",
                          placeholder=str(views.default_root() / "<run>"))
folder = typed.strip() or chosen
if not folder:
    st.info(f"No watched run yet under `{views.default_root()}`: add the callback to a training script, or type "
            "the folder it writes.")
    st.stop()

try:
    status = views.load(Path(folder)).status
except views.WatchRunError as error:
    st.error(common.readable_error(error))
    st.stop()


@st.fragment(run_every=3.0 if status == "running" else None)
def show(folder: str) -> None:
    run = views.load(Path(folder))
    measured = run.manifest.get("measured", {})
    st.info(f"**Verdict.** {views.verdict(run)}")
    st.caption(f"Measured: {measured.get('what', '?')} ({measured.get('n_modules', '?')} matrices, "
               f"{measured.get('n_parameters', 0):,} weights; {measured.get('not_measured_parameters', 0):,} other "
               f"trainable weights not measured). Mode: {run.manifest.get('config', {}).get('mode')}.")
    top = st.columns(2)
    with top[0]:
        common.show_figure(views.totals_figure(run), run.run_id, "watch_totals")
    with top[1]:
        common.show_figure(views.refusal_figure(run), run.run_id, "watch_refusal")
    left, right = st.columns([4, 1])
    metric = left.radio("Per layer", list(views.HEATMAP_METRICS), horizontal=True, key="widget.watch.metric",
                        format_func=lambda m: views.HEATMAP_METRICS[m][0])
    kind = right.selectbox("Modules", ["all", *views.kinds(run)], key="widget.watch.kind")
    common.show_figure(views.module_heatmap(run, metric, kind), run.run_id, f"watch_{metric}_{kind}")
    common.show_figure(views.drift_figure(run), run.run_id, "watch_drift")
    tables = views.export_tables(run)
    with st.expander("Recorded rows"):
        common.show_table(tables["totals"])
        common.data_downloads(tables["totals"], run.run_id, "totals")
        common.data_downloads(tables["modules"], run.run_id, "modules")


show(str(folder))
