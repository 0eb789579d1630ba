"""edgecl.devices: the serial link to a board, the agent that runs on it, and the host's side.

Profiles and roofline projections live in `profiles` and `roofline`.
"""

from .host import (BoardLatency, BoardProcess, Device, EvalResult, FetchResult, Hello, PushResult, board_latency,
                   connect, ensure_data, push_for_bench)
from .jobs import DataSpec, TrainSpec
from .link import AgentError, Link, LinkClosed, LinkError, LinkTimeout, MsgType, ProtocolError
from .transfer import TransferError

__all__ = [
    "AgentError", "BoardLatency", "BoardProcess", "DataSpec", "Device", "EvalResult", "FetchResult", "Hello", "Link",
    "LinkClosed", "LinkError", "LinkTimeout", "MsgType", "ProtocolError", "PushResult", "TrainSpec", "TransferError",
    "board_latency", "connect", "ensure_data", "push_for_bench",
]
