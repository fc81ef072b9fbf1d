"""Secure aggregation against a curious or malicious centre: what a site refuses to do.

Each attack sends the real ClientApp (fedcare.client.app:app) of a small synthetic hospital
the messages a malicious centre would; the site must refuse before it reveals anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcare.client.app import app as site_app
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.common.secagg import pack_nodes
from fedcare.server.app import federation_spec
from tests._flower import task_identity
from tests.server.test_secagg import (
    N_SITES,
    Loopback,
    global_model,
    site_contexts,
    synthetic_sites,
    train_round,
)


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_sites(tmp_path_factory.mktemp("secagg-attacks"))


def _train_message(cfg: FederationConfig, node: int, record: ConfigRecord | None) -> Message:
    model = global_model(Path(cfg.data_root), cfg)
    config = ConfigRecord(
        {
            keys.CFG_FEDCARE_ROUND: 1,
            keys.RC_RUN_ID: cfg.run_id,
            keys.CFG_SCHEMA_FINGERPRINT: federation_spec(cfg).feature_schema.fingerprint(),
        }
    )
    content = RecordDict({keys.REC_ARRAYS: pack_record(model), keys.REC_CONFIG: config})
    if record is not None:
        content[keys.REC_SECAGG] = record
    with task_identity(run_id=1, node_id=1):
        return Message(content, dst_node_id=node, message_type="train")


def _ask(context: Context, msg: Message) -> Message:
    with task_identity(run_id=1, node_id=context.node_id):
        return site_app(msg, context)


def _stage(node: int, record: dict[str, object], kind: str = keys.MT_SECAGG) -> Message:
    with task_identity(run_id=1, node_id=1):
        return Message(
            RecordDict({keys.REC_SECAGG: ConfigRecord(record)}), dst_node_id=node, message_type=kind
        )


def test_a_site_in_a_secure_run_never_sends_its_update_in_the_clear(
    hospitals: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(hospitals, tmp_path)
    node, context = next(iter(contexts.items()))
    cfg = FederationConfig.from_run_config(context.run_config)
    reply = _ask(context, _train_message(cfg, node, None))  # a plain train message
    assert reply.has_error() and reply.error.code == keys.ERR_POLICY
    assert "does not send its update in the clear" in reply.error.reason


def test_a_threshold_below_a_majority_is_refused_before_training(
    hospitals: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(hospitals, tmp_path)
    node, context = next(iter(contexts.items()))
    cfg = FederationConfig.from_run_config(context.run_config)
    record = ConfigRecord(
        {
            keys.SA_STAGE: keys.SA_ADVERTISE,
            keys.SA_NODES: pack_nodes(contexts),
            keys.SA_THRESHOLD: 2,  # of 4: two colluding "sites" of the centre would unmask
        }
    )
    reply = _ask(context, _train_message(cfg, node, record))
    assert reply.has_error() and "threshold in 3..4" in reply.error.reason
    assert "fedcare-secagg" not in context.state.config_records


def test_a_centre_swapping_a_sites_advertised_key_is_caught_by_its_signature(
    hospitals: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(hospitals, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    nodes = sorted(contexts)
    record = ConfigRecord(
        {keys.SA_STAGE: keys.SA_ADVERTISE, keys.SA_NODES: pack_nodes(nodes), keys.SA_THRESHOLD: 3}
    )
    adverts = {}
    for node in nodes:
        reply = _ask(contexts[node], _train_message(cfg, node, record))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert keys.REC_ARRAYS not in reply.content
        adverts[node] = reply.content.config_records[keys.REC_SECAGG]
    fields = (keys.SA_ENC_KEY, keys.SA_MASK_KEY, keys.SA_COMMITMENT, keys.SA_SIGNATURE)
    stage = {
        keys.SA_STAGE: keys.SA_SHARE_KEYS,
        keys.SA_ROUND: 1,
        keys.SA_NODES: pack_nodes(nodes),
        **{f: [adverts[n][f] for n in nodes] for f in fields},
        keys.SA_SITE_KEY: [adverts[n][keys.SA_SITE_KEY] for n in nodes],
    }
    # The centre puts its own masking key in place of site 1's, to unmask site 0 alone.
    stage[keys.SA_MASK_KEY] = list(stage[keys.SA_MASK_KEY])  # type: ignore[call-overload]
    stage[keys.SA_MASK_KEY][1] = bytes(range(32))  # type: ignore[index]
    reply = _ask(contexts[nodes[0]], _stage(nodes[0], stage))
    assert reply.has_error() and "not signed by the site key" in reply.error.reason
    # The refusal ended the round at the site: its secrets are gone.
    assert "fedcare-secagg" not in contexts[nodes[0]].state.config_records


def test_a_centre_asking_for_both_secrets_of_a_site_gets_neither(
    hospitals: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(hospitals, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    grid = Loopback(contexts)
    nodes = sorted(contexts)
    target, asked = nodes[3], nodes[0]
    grid.withhold = {keys.SA_UNMASK}  # the centre holds the unmasking request back
    train_round(grid, hospitals, cfg, global_model(hospitals, cfg))
    # Every site sent its masked input and now waits for the unmasking request: the centre
    # claims the target both survived (its seed) and dropped (its masking key).
    overlap = {
        keys.SA_STAGE: keys.SA_UNMASK,
        keys.SA_ROUND: 1,
        keys.SA_SURVIVORS: pack_nodes(nodes),
        keys.SA_DROPPED: pack_nodes([target]),
    }
    reply = _ask(contexts[asked], _stage(asked, overlap))
    assert reply.has_error() and "both survived and dropped" in reply.error.reason
    # Asking again, correctly this time, gets nothing: the round's secrets were erased.
    honest = {**overlap, keys.SA_DROPPED: pack_nodes([])}
    again = _ask(contexts[asked], _stage(asked, honest))
    assert again.has_error() and "holds no secure-aggregation round" in again.error.reason
    assert len(nodes) == N_SITES
