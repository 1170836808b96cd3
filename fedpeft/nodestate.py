"""What a node keeps between messages, in its Flower ``Context.state``: the survivors of
a new ClientApp process, which a deployment starts for every message.

- the error-feedback residual of its last compressed update (``compression``);
- its record-level or local DP accountant's history (``privacy.mode: record, local``);
- the adapters it last received and their view number (``compression.downlink``);
- FLoRA's merged updates Σ ΔW, dense per module, and the last round merged;
- the adapter's fixed structure (LoRA-SB's B and A, or the sparse mask, as received)
  and its digest.

A simulation's nodes start empty; a deployment's node state lasts one run.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from fedpeft.privacy.accounting import Entry, from_lists, to_lists
from fedpeft.types import State
from fedpeft.wire import record_to_state, state_to_record

MERGED_BASE = "fedpeft-merged-base"  # Σ of merged updates, dense per module
MERGED_ROUND = "fedpeft-merged-round"  # the last round merged
RESIDUAL = "fedpeft-residual"  # the error-feedback residual of the last update
HISTORY = "fedpeft-accountant"  # its privacy accountant's history
VIEW = "fedpeft-view"  # the adapters it last received (downlink compression)
VIEW_NUMBER = "fedpeft-view-number"  # which view they are
STRUCTURE = "fedpeft-structure"  # the adapter's fixed part (basis, mask), as received
STRUCTURE_DIGEST = "fedpeft-structure-digest"  # which one it is


def read_merged_base(node_state: RecordDict) -> tuple[int, State]:
    """The last round this node merged and the dense Σ ΔW per module (0, {} if none)."""
    if MERGED_ROUND not in node_state.config_records:
        return 0, {}
    merged_round = int(node_state.config_records[MERGED_ROUND]["round"])  # type: ignore[arg-type]
    return merged_round, record_to_state(node_state.array_records[MERGED_BASE])


def write_merged_base(node_state: RecordDict, merged_round: int, base_delta: State) -> None:
    node_state[MERGED_BASE] = state_to_record(base_delta)
    node_state[MERGED_ROUND] = ConfigRecord({"round": merged_round})


def read_residual(node_state: RecordDict) -> State:
    """The error-feedback residual this node kept from its last update ({} if none)."""
    if RESIDUAL not in node_state.array_records:
        return {}
    return record_to_state(node_state.array_records[RESIDUAL])


def write_residual(node_state: RecordDict, residual: State) -> None:
    node_state[RESIDUAL] = state_to_record(residual)


def read_history(node_state: RecordDict) -> list[Entry]:
    """This node's privacy accountant history ([] if none)."""
    if HISTORY not in node_state.config_records:
        return []
    record = node_state.config_records[HISTORY]
    return from_lists(record["noise"], record["rate"], record["steps"])  # type: ignore[arg-type]


def write_history(node_state: RecordDict, history: list[Entry]) -> None:
    if history:
        node_state[HISTORY] = ConfigRecord(to_lists(history))  # type: ignore[arg-type]


def read_view(node_state: RecordDict) -> tuple[int, State]:
    """The adapters this node last received (downlink compression) and their view
    number; (-1, {}) if it holds none."""
    if VIEW not in node_state.array_records:
        return -1, {}
    number = int(node_state.config_records[VIEW_NUMBER]["view"])  # type: ignore[arg-type]
    return number, record_to_state(node_state.array_records[VIEW])


def write_view(node_state: RecordDict, number: int, adapters: State) -> None:
    node_state[VIEW] = state_to_record(adapters)
    node_state[VIEW_NUMBER] = ConfigRecord({"view": number})


def read_structure(node_state: RecordDict) -> tuple[str, State]:
    """The fixed adapter structure this node holds and its digest ("", {} if none)."""
    if STRUCTURE not in node_state.array_records:
        return "", {}
    digest = str(node_state.config_records[STRUCTURE_DIGEST]["digest"])
    return digest, record_to_state(node_state.array_records[STRUCTURE])


def write_structure(node_state: RecordDict, digest: str, structure: State) -> None:
    node_state[STRUCTURE] = state_to_record(structure)
    node_state[STRUCTURE_DIGEST] = ConfigRecord({"digest": digest})
