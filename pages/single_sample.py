"""Is one sample enough? One sample's safety subspace vs the batch's, per layer; overlap vs n."""

import streamlit as st

from analysis.views import collection as views
from ui import common

common.run_inside_app()

st.title("Is one sample enough?")
run = common.require_run()
st.caption("For each module: overlap φ of one sample's top-k gradient subspace with the top-k subspace of all "
           "samples (1 = same subspace, k/d = random), and |⟨u₁ᵢ, u₁⟩| of the two top directions.")

scores = common.view(run, "sample_scores", "safety")
st.info(f"**Answer.** {common.view(run, 'single_sample_answer', 'safety')}")

options = list(scores["position"])
remembered = common.choice("sample", 0)
position = st.selectbox("Safety sample", options, index=options.index(remembered) if remembered in options else 0,
                        format_func=lambda i: f"{scores.loc[i, 'id']} · φ = {scores.loc[i, 'phi']:.2f}",
                        key=f"widget.sample.{run.run_id}")
if position != remembered:
    common.set_choice("sample", int(position))
sample = scores.loc[position]
with st.container(border=True):
    st.markdown(f"**Prompt** ({common.plain(sample.get('category') or 'no category')}): {common.plain(sample['prompt'])}")
    st.markdown(f"**Response:** {common.plain(sample['response'])}")

common.show_figure(common.view(run, "single_sample_figure", int(position), "safety"), run.run_id,
                   f"single_sample_{sample['id']}")

curves = common.view(run, "curve_labels")
if curves:
    module = common.module_picker(run, "Module for the overlap-vs-n curve", curves, key="curve_module")
    common.show_figure(common.view(run, "overlap_curve_figure", module), run.run_id, f"overlap_vs_n_{module}")
else:
    st.caption("This run has no overlap-vs-n curves (collection setting 'curve layers' was 'none').")

st.subheader("Best and worst samples")
columns = ["id", "category", "phi", "top1", "loss", "prompt"]
best_rows, worst_rows = views.best_and_worst(scores[[c for c in columns if c in scores]])
if len(best_rows) < 5:
    st.caption(f"{len(scores)} samples: the {len(best_rows)} closest and the {len(worst_rows)} furthest, "
               "so that no sample is in both tables.")
# one above the other, full width: side by side, a half-width table hid every column after phi at 1400 px
numbers = {name: st.column_config.NumberColumn(format="%.3f", width="small") for name in ("phi", "top1", "loss")}
numbers |= {"id": st.column_config.TextColumn(width="small"), "prompt": st.column_config.TextColumn(width="large")}
st.markdown("**Closest to the batch subspace**")
st.dataframe(best_rows, hide_index=True, width="stretch", column_config=numbers)
st.markdown("**Furthest from it**")
st.dataframe(worst_rows, hide_index=True, width="stretch", column_config=numbers)
common.data_downloads(scores, run.run_id, "single_sample_safety")
