"""Screens beyond the dashboard: trial detail, help, the study picker and the local GPU view."""
