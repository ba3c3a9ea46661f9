"""Streamlit-side helpers of the dashboard (``app.py`` and ``pages/``); the maths lives in ``analysis``."""
