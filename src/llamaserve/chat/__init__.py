"""Prompt rendering: chat templates, and later tool-call formats and image inputs."""
