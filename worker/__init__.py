"""Render workers: load diffusers pipelines and render jobs."""
