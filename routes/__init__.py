"""Blueprints: pages (HTML), api (JSON counters), clients (per-client counters), health."""
