"""Artifacts: the content-addressed store on disk and the fetcher that fills it.

:class:`ArtifactStore` owns ``<state>/artifacts`` (complete verified files, resumable
partials, temp files); :class:`Fetcher` downloads ``http(s)://``, ``file://`` and
``mqtt:<topic>`` artifacts into it under :class:`FetchLimits`, reporting through a
:data:`Progress` callback. Failures are :mod:`agent.errors` exceptions.
"""

from agent.device.artifacts._fetch import Fetcher
from agent.device.artifacts._limits import FetchLimits
from agent.device.artifacts._progress import Progress
from agent.device.artifacts._store import ArtifactStore

__all__ = ["ArtifactStore", "FetchLimits", "Fetcher", "Progress"]
