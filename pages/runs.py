"""Runs — what have I got? Stored runs, comparison, export of figures and data, deletion."""

import pandas as pd
import streamlit as st

from analysis.core.store import StoreError
from analysis.engine.results import CollectionStore
from analysis.views import collection as views
from analysis.views import export
from ui import common

common.run_inside_app()

st.title("What have I got?")
runs = CollectionStore().list_runs()
if runs.empty:
    st.info("No stored runs yet: collect one on the Setup page.")
    st.page_link("pages/setup.py", label="Go to Setup", icon=":material/tune:")
    st.stop()

# short labels and fixed widths: all 12 columns fit the main area of a 1400 px wide window (~940 px)
COLUMNS = {"run_id": ("run id", 135), "status": ("status", 75), "created": ("created", 120), "model": ("model", 95),
           "safety": ("safety set", 80), "utility": ("utility set", 80), "n_safety": ("safety n", 60),
           "n_utility": ("utility n", 60), "n_modules": ("modules", 60), "top_k": ("k", 35),
           "projection_dim": ("sketch p", 60), "size_mb": ("MiB", 50)}
shown_runs = runs.assign(created=runs["created"].astype(str).str.slice(0, 16).str.replace("T", " "))
st.dataframe(shown_runs, hide_index=True, width="stretch",
             column_config={name: st.column_config.Column(label, width=width) for name, (label, width) in COLUMNS.items()})
complete = runs[runs["status"] == "complete"]
if len(complete) < len(runs):
    st.caption(f"{len(runs) - len(complete)} run(s) are unfinished or damaged: collect the same settings again to "
               "resume, or delete them.")


def describe(run_id: str) -> str:
    row = runs[runs["run_id"] == run_id].iloc[0]
    projected = row.get("projection_dim")
    sketch = f" · projected p={int(projected)}" if projected is not None and projected == projected else ""
    return (f"{run_id} · {row['model']} · {row['n_safety']}+{row['n_utility']} samples · {row['n_modules']} "
            f"modules{sketch}")


ids = list(runs["run_id"])
active = common.choice("run_id")
run_id = st.selectbox("Run", ids, index=ids.index(active) if active in ids else 0, format_func=describe,
                      key="widget.runs.selected")
status = CollectionStore().status(run_id)

actions = st.columns([1, 1, 3])
if status == "complete" and actions[0].button("Make active", disabled=run_id == active, icon=":material/check:"):
    common.set_choice("run_id", run_id)
    st.rerun()
with actions[1].popover("Delete", icon=":material/delete:"):
    st.write(f"Delete run `{run_id}` and its files?")
    if st.button("Delete for good", type="primary", key="delete.confirm"):
        try:
            CollectionStore().delete(run_id)
        except StoreError as error:
            st.error(str(error))
        else:
            common.forget_run(run_id)
            st.rerun()

if status != "complete":
    st.warning(f"Run `{run_id}` is {status}; only complete runs can be shown and exported.")
    st.stop()
try:
    run = common.load_run(run_id)
except StoreError as error:
    st.error(str(error))
    st.stop()

st.subheader("Export")
with st.container(border=True):
    st.caption("The whole-run zip and the HTML report hold every layer × module-kind heatmap, the per-module "
               "figures of the module chosen here and the k@η heatmaps at the η chosen here (the same choices as "
               "on the other pages), the tables, the manifest and the one-line answers.")
    pick_module, pick_eta = st.columns([3, 2])
    with pick_module:
        module = common.module_picker(run, "Module for the per-module figures")
    with pick_eta:
        eta = st.select_slider("Energy threshold η", options=list(views.ETAS), value=common.choice("eta", 0.9),
                               key="widget.eta.runs")
        if eta != common.choice("eta"):
            common.set_choice("eta", eta)
    figures = common.view(run, "run_figures", eta, module)
    tables = common.view(run, "run_tables")
    choices = views.export_choices(run, eta, module)
    report = dict(summary=views.run_summary(run), notes=common.view(run, "run_answers", eta, module),
                  choices=choices)
    static = common.image_server()
    formats = export.IMAGE_FORMATS if static else ()
    buttons = st.columns(3)
    buttons[0].download_button(
        "Whole run (.zip)", data=lambda: export.run_zip(run.run_id, figures, tables, run.manifest, formats, **report),
        file_name=export.export_filename(run.run_id, "run", "zip"), mime=export.MIME_TYPES["zip"],
        on_click="ignore", icon=":material/folder_zip:", type="primary", key="download.zip",
        help=f"{len(figures)} figures as {', '.join(('html',) + formats)} (per-module figures of {module}, k@{eta:g} "
             "heatmaps), tables as CSV and JSON, manifest, report (about 0.3 s per image)")
    buttons[1].download_button(
        "HTML report", data=lambda: export.report_html(run.run_id, figures, tables, run.manifest, **report),
        file_name=export.export_filename(run.run_id, "report", "html"), mime=export.MIME_TYPES["html"],
        on_click="ignore", icon=":material/description:", key="download.report",
        help="One self-contained page (works offline): configuration, every figure, every table")
    buttons[2].download_button(
        "Manifest (.json)", data=export.to_json_bytes(run.manifest),
        file_name=export.export_filename(run.run_id, "manifest", "json"), mime=export.MIME_TYPES["json"],
        on_click="ignore", icon=":material/data_object:", key="download.manifest")
    for column, (name, frame) in zip(st.columns(len(tables)), tables.items()):
        with column:
            common.data_downloads(frame, run.run_id, name)
    if not static:
        st.caption(export.NO_BROWSER_MESSAGE)

    name = st.selectbox("One figure", list(figures), key="widget.runs.figure")
    common.show_figure(figures[name], run.run_id, name, key=f"runs.figure.{name}")

with st.expander("Configuration"):
    st.json(run.manifest.get("config", {}), expanded=False)

st.subheader("Compare runs")
choices = list(complete["run_id"])
if len(choices) < 2:
    st.caption("Collect a second run (e.g. another model, dataset or n) to compare.")
    st.stop()
default = [run_id] + [c for c in choices if c != run_id][:1]
picked = st.multiselect("Runs to compare", choices, default=default, max_selections=4, format_func=describe,
                        key="widget.runs.compare")
metric = st.selectbox("Metric", list(views.COMPARE_METRICS), format_func=views.COMPARE_METRICS.get,
                      key="widget.runs.metric")
if len(picked) >= 2:
    loaded = {run_id: common.load_run(run_id) for run_id in picked}
    st.dataframe(pd.DataFrame([views.run_summary(r) for r in loaded.values()]), hide_index=True, width="stretch")
    common.show_figure(views.compare_figure(loaded, metric), "compare", f"compare_{metric}_{'_'.join(picked)}")
    for column, (other_id, other) in zip(st.columns(len(loaded)), loaded.items()):
        with column:
            common.show_figure(common.view(other, "metric_heatmap", metric), other_id, f"{metric}_heatmap")
