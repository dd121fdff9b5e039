"""Northbound publishers: meterhub's data pushed to systems the user already runs (Home Assistant)."""
