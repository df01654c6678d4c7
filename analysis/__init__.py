"""Run directories -> tidy pandas tables (per-class ESS, rank correlations, method comparison)."""
