"""Findings: each seed claim (I low rank, II conflict, III one sample) decided by a stated test, with its interval."""

import streamlit as st

from analysis.engine import evidence as ev
from analysis.engine.resampling import RESAMPLING_FILE, load_evidence
from analysis.views import evidence_figures as efig
from analysis.views import findings as findings_views
from ui import common

common.run_inside_app()

st.title("Findings: do the seeds' claims hold here?")
run = common.require_run()
st.caption(f"Each claim is decided by one statistic over the run's modules and a stated test: **supported** when "
           f"the test rejects at α = {findings_views.ALPHA} in the claimed direction, **contradicted** when it "
           "rejects in the opposite one, **not shown at this n** otherwise. Intervals: 95% percentile bootstrap over "
           "prompts (every module sees the same resampled prompts). Per-module significance: "
           f"{ev.MULTIPLE_COMPARISONS}. The claims are about aligned chat models.")
if not (run.folder / RESAMPLING_FILE).exists():
    st.warning("This run was stored before intervals existed. Cosines and pair shares get theirs from the stored "
               "Gram matrices now; the rank and single-sample tests need the factors: collect the run again on "
               "**Setup** (bootstrap and permutations are on by default).")
    bar = st.progress(0.0, "Resampling the stored Gram matrices…")
    evidence = load_evidence(run, progress=lambda f: bar.progress(f, "Resampling the stored Gram matrices…"))
    bar.empty()
else:
    evidence = load_evidence(run)
results = findings_views.claim_results(run, evidence)
frame, text = findings_views.findings(run, evidence)
st.markdown(text)
shown = frame[["claim", "verdict", "measure", "shown", "n_needed", "test"]]  # the verdict before the long texts
st.dataframe(shown, hide_index=True, width="stretch",
             column_config={"claim": st.column_config.TextColumn("claim", width=50),
                            "verdict": st.column_config.TextColumn("verdict", width=150),
                            "measure": st.column_config.TextColumn("measure", width="medium"),
                            "shown": st.column_config.TextColumn("value (95% CI), p", width="large"),
                            "n_needed": st.column_config.NumberColumn("n per set needed (estimate)", format="%.0f",
                                                                      help="n per set at which the 95% interval "
                                                                           "would exclude 'no effect', extrapolated "
                                                                           "from the bootstrap spread (SE ~ 1/√n)")})
with st.expander("Decision rules and caveats"):
    for _, row in frame.iterrows():
        st.markdown(f"- **{row['claim']} · {row['measure']}**: {row['rule']}."
                    + (f" *Caveat: {row['caveat']}.*" if row["caveat"] else ""))
common.data_downloads(frame, run.run_id, "findings")

st.subheader("Observed value against its null distribution")
figures = efig.claim_figures(run, results, columns=3)
for column, (claim, figure) in zip(st.columns(len(figures)), figures.items()):
    with column:
        common.show_figure(figure, run.run_id, f"null_{claim}")

st.subheader("Module by module")
modules = findings_views.module_table(run, evidence)
lines = findings_views.significance_lines(modules)
if lines:
    st.markdown("  \n".join(lines))
left, right = st.columns(2)
with left:
    common.show_figure(efig.module_interval_figure(modules, "diff_k90", "k@0.9, safety − utility", "directions",
                                                   "diff_k90_significant"), run.run_id, "module_diff_k90")
with right:
    common.show_figure(efig.module_interval_figure(modules, "cosine_su", "cos(G_s, G_u)", "cosine",
                                                   "cosine_su_zero_significant"), run.run_id, "module_cosine")
common.data_downloads(modules, run.run_id, "module_intervals")
st.page_link("pages/spectra.py", label="I · the spectra", icon=":material/show_chart:")
st.page_link("pages/conflicts.py", label="II · the conflicts", icon=":material/compare_arrows:")
st.page_link("pages/single_sample.py", label="III · one sample", icon=":material/filter_1:")
