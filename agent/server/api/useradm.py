"""Mender's API: useradm (not written yet)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["mender"])
