"""What a node does with a train or an evaluate message: the message's content and the
node's state in, the reply's content out (the state updated in place).

Two callers run exactly this code: the ClientApp of ``clients/app.py`` in its own process
(Flower's default), and the warm node worker of :mod:`fedpeft.node`, which serves the
same messages forwarded over a local socket (:mod:`fedpeft.nodelink`). Keeping the
handlers free of Flower's ``Message`` and ``Context`` is what lets both give the same
replies, byte for byte.

This module imports torch, transformers and peft (through :mod:`fedpeft.client`): the
forwarding ClientApp must not import it.
"""

from __future__ import annotations

import dataclasses

from flwr.app import RecordDict

from fedpeft import client, lora_sb, nodestate, stages, wire


def _merged_base(ins: wire.TrainIns, node_state: RecordDict) -> wire.State:
    """This node's merged updates (FLoRA), kept in the node's state so that they survive
    a new ClientApp process (or a new worker) per message."""
    merged_round, base_delta = nodestate.read_merged_base(node_state)
    new_round, base_delta = client.merge_received(merged_round, base_delta, ins)
    if new_round != merged_round:
        nodestate.write_merged_base(node_state, new_round, base_delta)
    return base_delta


def _received(content: RecordDict, node_state: RecordDict) -> wire.TrainIns:
    """The message's instruction with the adapters in full (downlink compression: this
    node's view plus the change), the new view kept in the node's state; with the
    adapter's fixed structure (LoRA-SB's basis, the sparse mask), as sent or as kept."""
    ins = _with_structure(wire.decode_train_ins(content), node_state)
    if not client.parse_config(ins.config_json).compression.downlink:
        return ins
    view_number, view = nodestate.read_view(node_state)
    ins = client.received_adapters(ins, view_number, view)
    nodestate.write_view(node_state, ins.view, ins.adapters)
    return ins


def _with_structure(ins: wire.TrainIns, node_state: RecordDict) -> wire.TrainIns:
    """The adapter's fixed structure (LoRA-SB's basis, the sparse mask): one in the
    message is kept in the node's state; a message without one uses the kept one, which
    must be the one the message names."""
    if not ins.structure_digest:
        return ins
    if ins.structure is not None:
        if lora_sb.digest(ins.structure) != ins.structure_digest:
            raise client.MissingStructure("the structure received does not match its digest")
        nodestate.write_structure(node_state, ins.structure_digest, ins.structure)
        return ins
    digest, kept = nodestate.read_structure(node_state)
    if digest != ins.structure_digest:
        raise client.MissingStructure(
            f"this node holds adapter structure {digest or 'none'}, "
            f"the message is in {ins.structure_digest}"
        )
    return dataclasses.replace(ins, structure=kept)


def burnin(content: RecordDict, node_state: RecordDict) -> RecordDict:
    """The burn-in before round 1 (:func:`fedpeft.client.burnin_round`)."""
    return wire.encode_train_res(client.burnin_round(wire.decode_train_ins(content)))


def train(content: RecordDict, node_state: RecordDict) -> RecordDict:
    """One round of local training (:func:`fedpeft.stages.client_round`); the reply's
    content. The error-feedback residual and the accountant's history go to the state."""
    ins = _received(content, node_state)
    kept = client.Kept(nodestate.read_residual(node_state), nodestate.read_history(node_state))
    res, kept = stages.client_round(ins, _merged_base(ins, node_state), kept)
    nodestate.write_residual(node_state, kept.residual)
    nodestate.write_history(node_state, kept.history)
    return wire.encode_train_res(res)


def evaluate(content: RecordDict, node_state: RecordDict) -> RecordDict:
    """The received adapters scored on this node's held-out split; the reply's content."""
    ins = _received(content, node_state)
    n, metrics = client.evaluate_round(ins, _merged_base(ins, node_state))
    return wire.encode_eval_res(n, metrics)
