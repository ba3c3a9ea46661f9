"""Safety Subspace Explorer: ``streamlit run app.py``.

One page per question. Add a page with one line in ``PAGES``.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import streamlit as st  # noqa: E402

st.set_page_config(page_title="Safety Subspace Explorer", page_icon=":material/shield:", layout="wide")

PAGES = [
    st.Page("pages/setup.py", title="Setup: what do I analyse?", icon=":material/tune:", default=True),
    st.Page("pages/spectra.py", title="Is safety low-rank?", icon=":material/show_chart:"),
    st.Page("pages/conflicts.py", title="Do safety and utility fight?", icon=":material/compare_arrows:"),
    st.Page("pages/single_sample.py", title="Is one sample enough?", icon=":material/filter_1:"),
    st.Page("pages/findings.py", title="Findings: do the claims hold?", icon=":material/fact_check:"),
    st.Page("pages/safety.py", title="Is the model safe?", icon=":material/shield:"),
    st.Page("pages/finetune.py", title="Fine-tune: does SPF keep it safe?", icon=":material/model_training:"),
    st.Page("pages/defences.py", title="Defence lab: which defence holds?", icon=":material/security:"),
    st.Page("pages/why.py", title="Why does the defence fail?", icon=":material/troubleshoot:"),
    st.Page("pages/watch.py", title="Watch a training run", icon=":material/monitor_heart:"),
    st.Page("pages/screen.py", title="Which of my data is risky?", icon=":material/manage_search:"),
    st.Page("pages/runs.py", title="Runs and export", icon=":material/folder_open:"),
]

# st.navigation first, the heavy imports (pandas, plotly, analysis) after it: until a session has called it, Streamlit
# shows the pages/ folder's raw file names in the sidebar, and on a cold start the imports took seconds.
page = st.navigation(PAGES)
with st.spinner("Loading…"):
    from ui import common  # noqa: E402
st.session_state[common.APP_ENTERED] = True
with st.sidebar:
    common.sidebar()
page.run()
