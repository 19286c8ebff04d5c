"""The dissect dashboard: `streamlit run dashboard`. UI only; every computation is a call into `dissect`."""
