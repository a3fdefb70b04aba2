"""Runs one rank's lowered schedule with torch.distributed only (no megatron imports).

p2p = P2P(placement, rank, make_buffer, channels=build_channels(message_pairs(placement)))
executor = Executor(placement, rank, callbacks, p2p)
executor.run(lowered.programs[rank])      # callbacks.reduce_grad starts ReplicaGradSync
"""

from megatron_bitpipe.runtime.callbacks import StageCallbacks
from megatron_bitpipe.runtime.channels import (
    CommunicatorSetupError,
    CommunicatorSpec,
    build_channels,
    create_groups,
    initialize_communicators,
    message_pairs,
    step_communicators,
)
from megatron_bitpipe.runtime.errors import P2PError, P2PTimeoutError
from megatron_bitpipe.runtime.executor import Executor, TraceEvent, forward_program
from megatron_bitpipe.runtime.grad_sync import (
    ReplicaGradSync,
    broadcast_replica_parameters,
    replica_pair_groups,
    replica_partner,
)
from megatron_bitpipe.runtime.p2p import P2P
from megatron_bitpipe.runtime.watchdog import Watchdog

__all__ = [
    "CommunicatorSetupError",
    "CommunicatorSpec",
    "Executor",
    "P2P",
    "P2PError",
    "P2PTimeoutError",
    "ReplicaGradSync",
    "StageCallbacks",
    "TraceEvent",
    "Watchdog",
    "broadcast_replica_parameters",
    "build_channels",
    "create_groups",
    "forward_program",
    "initialize_communicators",
    "message_pairs",
    "replica_pair_groups",
    "replica_partner",
    "step_communicators",
]
