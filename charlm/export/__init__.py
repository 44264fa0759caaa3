"""Exporting a checkpoint for use without charlm."""
