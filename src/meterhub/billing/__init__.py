"""Tariffs and bills, sans-I/O and in :class:`decimal.Decimal` (never float).

- :mod:`meterhub.billing.money`: parsing amounts, rounding (once, per line).
- :mod:`meterhub.billing.tariff`: tariff specifications (flat, time-of-use, tiered), their
  validation, and the band schedule over a span of time in a site's time zone.
- :mod:`meterhub.billing.meter`: a meter's cleaned cumulative counter (resets, rebases and glitches
  as :func:`meterhub.core.energy.attribute` classifies them) and its reading at any instant.
- :mod:`meterhub.billing.engine`: a bill from meter intervals, occupancy and tariff versions.
"""
