"""Mender's API: mender_artifacts (not written yet)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["mender"])
