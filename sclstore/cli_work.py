"""CLI commands that do work over stored runs: query, eval, demo (registered on ``cli.app``)."""

from __future__ import annotations
