"""Do safety and utility fight? Cosines of their gradients, conflicting sample pairs, subspace angles."""

import streamlit as st

from ui import common

common.run_inside_app()

st.title("Do safety and utility fight?")
run = common.require_run()
st.caption("A negative cosine between the safety and the utility gradient means a utility descent step raises "
           "the safety loss to first order. Red cells and a mass left of 0 mean conflict.")

st.info(f"**Answer.** {common.view(run, 'conflict_answer')}")
left, right = st.columns(2)
with left:
    common.show_figure(common.view(run, "cosine_heatmap"), run.run_id, "cosine_heatmap")
with right:
    common.show_figure(common.view(run, "fraction_negative_heatmap"), run.run_id, "fraction_negative_heatmap")

st.subheader("One module in detail")
module = common.module_picker(run)
st.markdown(common.view(run, "conflict_answer", module))
left, right = st.columns(2)
with left:
    common.show_figure(common.view(run, "cross_cosine_histogram", module), run.run_id, f"pair_cosines_{module}")
with right:
    common.show_figure(common.view(run, "principal_angles_figure", module), run.run_id, f"principal_angles_{module}")
left, right = st.columns(2)
with left:
    common.show_figure(common.view(run, "overlap_heatmap"), run.run_id, "overlap_heatmap")
with right:
    common.show_figure(common.view(run, "category_conflict_figure", module), run.run_id, f"categories_{module}")
