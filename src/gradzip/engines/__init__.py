"""Engines: how payload bytes move. The step itself lives in :mod:`.core`."""

from .core import SERVER, Algorithm, ServerState, WorkerState
from .simulated import SimulatedEngine, StepStats

__all__ = ["SERVER", "Algorithm", "ServerState", "SimulatedEngine", "StepStats", "WorkerState"]
