"""Secure aggregation against a curious or malicious centre: what a site refuses to do.

Each attack sends the real ClientApp (fedcare.client.app:app) of a small synthetic hospital
the messages a malicious centre would; the site must refuse before it reveals anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcare.client.app import app as site_app
from fedcare.client.secagg import load_peers_file
from fedcare.client.site_config import load_site_config
from fedcare.common import keys
from fedcare.common import secagg as sa
from fedcare.common.audit import public_key_raw
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.common.secagg import pack_nodes
from fedcare.server.app import federation_spec
from tests._flower import task_identity
from tests.client.test_site_config import minimal, write
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


def _advertise(
    context: Context, cfg: FederationConfig, nodes: list[int], threshold: int
) -> Message:
    record = ConfigRecord(
        {
            keys.SA_STAGE: keys.SA_ADVERTISE,
            keys.SA_NODES: pack_nodes(nodes),
            keys.SA_THRESHOLD: threshold,
        }
    )
    return _ask(context, _train_message(cfg, context.node_id, record))


def test_a_sybil_the_centre_invents_is_refused_before_any_share_leaves(
    hospitals: Path, tmp_path: Path
) -> None:
    """The centre lists the victim and one site it made up (threshold 2), signing the
    sybil's keys with a key of its own: the victim pins its peers and refuses."""
    contexts = site_contexts(hospitals, tmp_path)
    victim, context = next(iter(contexts.items()))
    cfg = FederationConfig.from_run_config(context.run_config)
    sybil = 12345
    nodes = [victim, sybil]
    advert = _advertise(context, cfg, nodes, 2)
    assert not advert.has_error(), advert.error.reason if advert.has_error() else ""
    mine = advert.content.config_records[keys.REC_SECAGG]
    ctx = sa.RoundContext(run_id=cfg.run_id, round=1)
    fake = sa.new_round_keys(ctx).public
    identity = Ed25519PrivateKey.generate()
    stage = {
        keys.SA_STAGE: keys.SA_SHARE_KEYS,
        keys.SA_ROUND: 1,
        keys.SA_NODES: pack_nodes(nodes),
        keys.SA_ENC_KEY: [mine[keys.SA_ENC_KEY], fake.enc],
        keys.SA_MASK_KEY: [mine[keys.SA_MASK_KEY], fake.mask],
        keys.SA_COMMITMENT: [mine[keys.SA_COMMITMENT], fake.seed_commitment],
        keys.SA_SIGNATURE: [
            mine[keys.SA_SIGNATURE],
            identity.sign(sa.key_statement(ctx, sybil, fake)),
        ],
        keys.SA_SITE_KEY: [mine[keys.SA_SITE_KEY], public_key_raw(identity)],
    }
    reply = _ask(context, _stage(victim, stage))
    assert reply.has_error() and "does not pin" in reply.error.reason
    assert "fedcare-secagg" not in context.state.config_records  # its secrets are gone


def test_a_round_listing_more_sites_than_the_site_pins_is_refused_before_training(
    hospitals: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(hospitals, tmp_path)
    node, context = next(iter(contexts.items()))
    cfg = FederationConfig.from_run_config(context.run_config)
    nodes = [*contexts, 7, 8]  # two sites no hospital of the federation runs
    reply = _advertise(context, cfg, nodes, 4)
    assert reply.has_error() and f"pins only {N_SITES}" in reply.error.reason
    assert "fedcare-secagg" not in context.state.config_records
    assert not (tmp_path / "site-0" / "secagg-advertised").exists()  # it never advertised


def test_a_deployed_site_without_a_peers_file_refuses_secure_aggregation(tmp_path: Path) -> None:
    site_cfg = load_site_config(write(tmp_path, minimal()))
    with pytest.raises(ConfigError, match="secagg_peers is not set"):
        site_cfg.secagg_roster()


def test_a_deployed_sites_roster_is_its_peers_file_and_its_own_key(tmp_path: Path) -> None:
    other = public_key_raw(Ed25519PrivateKey.generate())
    peers = tmp_path / "peers.toml"
    peers.write_text(f'[peers]\nhospital-b = "{other.hex()}"\n', encoding="utf-8")
    site_cfg = load_site_config(write(tmp_path, {**minimal(), "secagg_peers": "peers.toml"}))
    roster = site_cfg.secagg_roster()
    assert roster["hospital-b"] == other and set(roster) == {"hospital-b", site_cfg.site_id}
    peers.write_text('[peers]\nhospital-b = "00ff"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"secagg_peers .*peers.toml.*hospital-b"):
        site_cfg.secagg_roster()
    peers.write_text(f'[peers]\n{site_cfg.site_id} = "{other.hex()}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="another key than its own"):
        site_cfg.secagg_roster()
    with pytest.raises(ConfigError, match="no \\[peers\\] table"):
        load_peers_file(write(tmp_path, {"hospital-b": 1}, name="bad.toml"), origin="here")


def test_a_short_share_box_is_refused_not_a_crash(hospitals: Path, tmp_path: Path) -> None:
    """A 2-byte share box (cryptography would raise ValueError) is the protocol's own
    error: refused, and the round's secrets go."""
    contexts = site_contexts(hospitals, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    grid = Loopback(contexts)
    nodes = sorted(contexts)
    asked = nodes[0]

    def tamper(stage: str, node: int, msg: Message) -> None:
        if stage == keys.SA_MASKED_INPUT and node == asked:
            record = msg.content.config_records[keys.REC_SECAGG]
            record[keys.SA_BOXES] = [b"xx", *list(record[keys.SA_BOXES])[1:]]  # type: ignore[arg-type]

    grid.tamper = tamper
    grid.withhold = {keys.SA_UNMASK}
    train_round(grid, hospitals, cfg, global_model(hospitals, cfg))
    honest = {
        keys.SA_STAGE: keys.SA_UNMASK,
        keys.SA_ROUND: 1,
        keys.SA_SURVIVORS: pack_nodes(nodes),
        keys.SA_DROPPED: pack_nodes([]),
    }
    reply = _ask(contexts[asked], _stage(asked, honest))
    assert reply.has_error() and "not the 176 of a share box" in reply.error.reason
    assert "fedcare-secagg" not in contexts[asked].state.config_records
