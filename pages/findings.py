"""Findings: each seed claim (I low rank, II conflict, III one sample) with our number, a verdict and a caveat."""

import streamlit as st

from analysis.views import findings as findings_views
from ui import common

common.run_inside_app()

st.title("Findings: do the seeds' claims hold here?")
run = common.require_run()
st.caption("The seeds' claims are about aligned chat models. For the active run, each claim is set beside our "
           "number (medians or shares across the run's modules), a verdict from fixed thresholds "
           f"(majority = more than {findings_views.MAJORITY:.0%} of modules; one sample 'finds' the subspace at "
           f"median φ ≥ {findings_views.STRONG_PHI}), and a caveat where the run is small (fewer than "
           f"{findings_views.SMALL_N} samples per set) or the model is not the aligned one.")
frame, text = findings_views.findings(run)
st.markdown(text)
# the readings and caveats are the text above; the table keeps the numbers narrow enough to read (all in the export)
shown = frame.drop(columns=[c for c in ("statement", "reading", "caveat") if c in frame.columns])
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={"value": st.column_config.NumberColumn("ours", format="%.4g"),
                            "reference": st.column_config.NumberColumn("compared with", format="%.4g")})
common.data_downloads(frame, run.run_id, "findings")
st.page_link("pages/spectra.py", label="I · the spectra", icon=":material/show_chart:")
st.page_link("pages/conflicts.py", label="II · the conflicts", icon=":material/compare_arrows:")
st.page_link("pages/single_sample.py", label="III · one sample", icon=":material/filter_1:")
