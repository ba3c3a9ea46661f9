"""Is safety low-rank? Spectra and CER(k) of one module; rank metrics per layer x module kind."""

import streamlit as st

from analysis.views import collection as views
from ui import common

common.run_inside_app()

st.title("Is safety low-rank?")
run = common.require_run()
st.caption("Singular values of the batch-mean gradient of each module. A low-rank gradient puts most of its "
           "energy (sum of s²) in a few directions: CER(k) reaches η at a small k.")

controls = st.columns([3, 2, 2])
with controls[0]:
    module = common.module_picker(run)
with controls[1]:
    eta = st.select_slider("Energy threshold η", options=list(views.ETAS), value=common.choice("eta", 0.9),
                           key="widget.eta.spectra")
    if eta != common.choice("eta"):
        common.set_choice("eta", eta)
with controls[2]:
    normalise = st.toggle("Normalise spectra by s₁", value=True, key="widget.normalise")

st.info(f"**Answer.** {common.view(run, 'low_rank_answer', eta, module)}  \n{common.view(run, 'low_rank_answer', eta)}")

spectrum, cer = common.view(run, "spectra_figures", module, eta, normalise)
left, right = st.columns(2)
with left:
    common.show_figure(spectrum, run.run_id, f"spectra_{module}")
with right:
    common.show_figure(cer, run.run_id, f"cer_{module}")

st.subheader("Across layers and modules")
metric = st.radio("Metric", list(views.RANK_METRICS), format_func=lambda m: views.RANK_METRICS[m].replace("η", f"η={eta:g}"),
                  horizontal=True, key="widget.rank_metric")
if metric != "k_eta":  # the answer above counts k@η; this one follows the chosen metric and its direction
    st.markdown(common.view(run, "low_rank_answer", eta, None, metric))
st.caption(f"Ratio safety / utility: {views.ratio_reading(metric, eta)}.")
heatmaps = common.view(run, "rank_heatmaps", metric, eta)
left, right = st.columns(2)
with left:
    common.show_figure(heatmaps["safety"], run.run_id, f"{metric}_safety")
with right:
    common.show_figure(heatmaps["utility"], run.run_id, f"{metric}_utility")
common.show_figure(heatmaps["ratio"], run.run_id, f"{metric}_ratio")
with st.expander("Per-module metrics table"):
    st.dataframe(run.table, hide_index=True, width="stretch")
    common.data_downloads(run.table, run.run_id, "modules")
