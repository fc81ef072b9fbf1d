"""The secure-aggregation core (common/secagg.py) against numpy references and its claims."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedcare.common.secagg import (
    PRIME,
    SHARE_OF_SEED,
    Quantizer,
    RoundContext,
    SecAggError,
    check_overflow,
    combine_shares,
    expand_mask,
    input_bound,
    masked_input,
    new_round_keys,
    open_shares,
    share_keys,
    split_secret,
    unmask,
    unmask_shares,
    weighted_input,
    weighted_mean,
)

CTX = RoundContext(run_id="run-a", round=3)


def _round(n: int, threshold: int, d: int = 50, seed: int = 0):
    """n sites' keys, public keys, stage-2 inboxes, and float inputs of norm <= 1."""
    rng = np.random.default_rng(seed)
    nodes = [1000 + 7 * i for i in range(n)]
    site_keys = {node: new_round_keys(CTX) for node in nodes}
    public = {node: k.public for node, k in site_keys.items()}
    boxes = {
        node: share_keys(k, me=node, peers=public, threshold=threshold, ctx=CTX)
        for node, k in site_keys.items()
    }
    inbox = {node: {src: boxes[src][node] for src in nodes} for node in nodes}
    x = {}
    for node in nodes:
        v = rng.normal(size=d)
        x[node] = v / np.linalg.norm(v) * rng.uniform(0.1, 1.0)
    return nodes, site_keys, public, inbox, x


def test_shamir_any_threshold_subset_gives_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, xs=[3, 9, 11, 2**63 + 5, 40], threshold=3)
    for subset in itertools.combinations(shares, 3):
        assert combine_shares({x: shares[x] for x in subset}, threshold=3) == secret
    with pytest.raises(SecAggError, match="cannot give a secret"):
        combine_shares({x: shares[x] for x in list(shares)[:2]}, threshold=3)
    # Two shares of a 3-of-n sharing fit every secret: interpolating them with a third point
    # at x = 0 of any value is a valid degree-2 polynomial, so they say nothing about it.


def test_shamir_detects_a_wrong_share_among_more_than_threshold() -> None:
    shares = split_secret(b"\x01" * 32, xs=[1, 2, 3, 4], threshold=2)
    bad = dict(shares)
    bad[4] = ((int.from_bytes(bad[4], "big") + 1) % PRIME).to_bytes(66, "big")
    with pytest.raises(SecAggError, match="inconsistent"):
        combine_shares(bad, threshold=2)


def test_masks_are_chacha20_streams_distinct_per_seed() -> None:
    a, b = expand_mask(b"\x00" * 32, 1000), expand_mask(b"\x01" + b"\x00" * 31, 1000)
    assert a.dtype == np.uint64 and not np.array_equal(a, b)
    assert np.array_equal(a, expand_mask(b"\x00" * 32, 1000))
    # RFC 7539 / RFC 8439 test vector: ChaCha20 block of the all-zero key and nonce.
    assert a[:1].tobytes().hex() == "76b8e0ada0f13d90"


@pytest.mark.parametrize(("n", "threshold", "dropped"), [(5, 3, set()), (5, 3, {1007, 1028})])
def test_unmasked_sum_equals_the_plain_sum_within_the_stated_bound(
    n: int, threshold: int, dropped: set[int]
) -> None:
    nodes, site_keys, public, inbox, x = _round(n, threshold)
    q = Quantizer(scale_bits=24, bound=1.0)
    survivors = set(nodes) - dropped
    y = {
        node: masked_input(q.encode(x[node]), site_keys[node], me=node, peers=public, ctx=CTX)
        for node in survivors
    }
    shares = {
        node: unmask_shares(
            site_keys[node], me=node, inbox=inbox[node], peers=public,
            survivors=survivors, dropped=dropped, threshold=threshold, ctx=CTX,
        )
        for node in survivors
    }  # fmt: skip
    total = q.decode(unmask(y, public=public, shares=shares, threshold=threshold, ctx=CTX))
    reference = np.sum([x[node] for node in survivors], axis=0)
    assert np.max(np.abs(total - reference)) <= q.max_error(len(survivors))
    assert q.max_error(len(survivors)) < 1e-6


def test_a_masked_input_looks_uniform_and_a_proper_subset_sums_to_noise() -> None:
    nodes, site_keys, public, _, _ = _round(4, 3, d=20_000)
    q = Quantizer(scale_bits=24, bound=1.0)
    zero = np.zeros(20_000)
    y = {n: masked_input(q.encode(zero), site_keys[n], me=n, peers=public, ctx=CTX) for n in nodes}
    # A zero input's masked form: its top bits are fair coins (a uniform element of Z_2^64).
    for value in (y[nodes[0]], y[nodes[0]] + y[nodes[1]] + y[nodes[2]]):
        top = (value >> np.uint64(63)).astype(float)
        assert abs(top.mean() - 0.5) < 0.02
        low = (value & np.uint64(0xFF)).astype(float)
        assert abs(low.mean() - 127.5) < 3.0
    # Without the seeds, the sum of all is not the sum of the inputs (the self masks stay).
    assert np.any(y[nodes[0]] + y[nodes[1]] + y[nodes[2]] + y[nodes[3]] != 0)


def test_an_honest_site_never_reveals_both_secrets_of_one_site() -> None:
    nodes, site_keys, public, inbox, _ = _round(4, 3)
    me = nodes[0]
    kwargs = dict(inbox=inbox[me], peers=public, threshold=3, ctx=CTX)
    with pytest.raises(SecAggError, match="both survived and dropped"):
        unmask_shares(site_keys[me], me=me, survivors=set(nodes), dropped={nodes[1]}, **kwargs)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        unmask_shares(
            site_keys[me], me=me, survivors={nodes[0], nodes[1]},
            dropped={nodes[2], nodes[3]}, **kwargs,
        )  # fmt: skip
    shares = unmask_shares(
        site_keys[me], me=me, survivors=set(nodes[:3]), dropped={nodes[3]}, **kwargs
    )
    assert {kind for node, (kind, _) in shares.items() if node != nodes[3]} == {SHARE_OF_SEED}


def test_a_wrong_unmasking_share_is_detected() -> None:
    nodes, site_keys, public, inbox, x = _round(3, 2)
    q = Quantizer(scale_bits=20, bound=1.0)
    y = {n: masked_input(q.encode(x[n]), site_keys[n], me=n, peers=public, ctx=CTX) for n in nodes}
    shares = {
        n: unmask_shares(
            site_keys[n], me=n, inbox=inbox[n], peers=public, survivors=set(nodes),
            dropped=set(), threshold=2, ctx=CTX,
        )
        for n in nodes[:2]
    }  # fmt: skip
    kind, raw = shares[nodes[0]][nodes[2]]
    shares[nodes[0]][nodes[2]] = (kind, (int.from_bytes(raw, "big") ^ 1).to_bytes(66, "big"))
    with pytest.raises(SecAggError, match="a site sent a wrong share"):
        unmask(y, public=public, shares=shares, threshold=2, ctx=CTX)


def test_shares_are_bound_to_sender_recipient_and_round() -> None:
    nodes, site_keys, public, inbox, _ = _round(3, 2)
    me, other = nodes[0], nodes[1]
    swapped = dict(inbox[me])
    swapped[other] = inbox[nodes[2]][other]  # a ciphertext for another recipient
    with pytest.raises(SecAggError, match="do not decrypt"):
        unmask_shares(
            site_keys[me], me=me, inbox=swapped, peers=public, survivors=set(nodes),
            dropped=set(), threshold=2, ctx=CTX,
        )  # fmt: skip
    with pytest.raises(SecAggError, match="do not decrypt"):
        unmask_shares(
            site_keys[me], me=me, inbox=inbox[me], peers=public, survivors=set(nodes),
            dropped=set(), threshold=2, ctx=RoundContext(run_id="run-a", round=4),
        )  # fmt: skip


def test_overflow_bound_is_sites_times_bound_times_scale() -> None:
    check_overflow(n_sites=100, bound=1000.0, scale_bits=40)  # 1e5 * 2^40 ~ 2^56.6
    with pytest.raises(SecAggError, match="could overflow"):
        check_overflow(n_sites=100, bound=1000.0, scale_bits=47)  # ~ 2^63.6
    q = Quantizer(scale_bits=24, bound=1.0)
    with pytest.raises(SecAggError, match="exceeds the bound"):
        q.encode(np.array([1.5]))
    with pytest.raises(SecAggError, match="NaN"):
        q.encode(np.array([np.nan]))
    # At the limit the ring sum still decodes exactly: n inputs all at +bound.
    n, bits = 4, 52
    q = Quantizer(scale_bits=bits, bound=1.0)
    check_overflow(n_sites=n, bound=1.0, scale_bits=bits)
    total = np.zeros(1, np.uint64)
    for _ in range(n):
        total += q.encode(np.array([1.0]))
    assert q.decode(total)[0] == 4.0


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"strategy": "fedmedian"}, "only fedavg aggregates"),
        ({"strategy": "fedprox", "proximal-mu": 0.01}, "Fix: strategy = 'fedavg'"),
        ({"max-update-norm": 0.0}, "set max-update-norm > 0"),
    ],
)
def test_a_secure_run_config_is_refused_with_the_fix(settings: dict, needle: str) -> None:
    from fedcare.common.errors import ConfigError
    from fedcare.common.federation import FederationConfig

    base = {"secure-aggregation": True, "max-update-norm": 10.0}
    with pytest.raises(ConfigError, match=needle):
        FederationConfig.from_run_config({**base, **settings})
    ok = FederationConfig.from_run_config({**base, "hospital-dp-noise": 1.0, "max-update-norm": 0})
    assert ok.secagg_bound == ok.hospital_dp_clip


@pytest.mark.parametrize("blob", [b"", b"xx", bytes(27), bytes(500)])
def test_a_share_box_of_the_wrong_length_is_the_protocols_error(blob: bytes) -> None:
    """cryptography raises ValueError for a ciphertext shorter than its tag: never let it
    escape as anything but SecAggError."""
    nodes, site_keys, public, inbox, _ = _round(3, 2)
    me, other = nodes[0], nodes[1]
    with pytest.raises(SecAggError, match="share box"):
        open_shares(site_keys[me], me=me, inbox={other: blob}, peers=public, ctx=CTX)
    # The right length, wrong bytes: still the protocol's own error.
    with pytest.raises(SecAggError, match="do not decrypt"):
        open_shares(
            site_keys[me], me=me, inbox={other: bytes(len(inbox[me][other]))}, peers=public,
            ctx=CTX,
        )  # fmt: skip


def test_the_weighted_mean_is_fedavgs_against_numpy() -> None:
    """Sites mask [n_k x_k, n_k] with their own n_k; the unmasked sum gives numpy's weighted
    average, within the rounding of the sum divided by the total weight."""
    nodes, site_keys, public, inbox, x = _round(4, 3, d=30)
    n = {node: 10 + 37 * i for i, node in enumerate(nodes)}
    bound, bits = 1.0, 24
    masked = {}
    for node in nodes:
        q = Quantizer(scale_bits=bits, bound=input_bound(weight=n[node], bound=bound))
        check_overflow(n_sites=len(nodes), bound=q.bound, scale_bits=bits)
        masked[node] = masked_input(
            q.encode(weighted_input(x[node], weight=n[node])), site_keys[node], me=node,
            peers=public, ctx=CTX,
        )  # fmt: skip
    shares = {
        node: unmask_shares(
            site_keys[node],
            me=node,
            inbox=inbox[node],
            peers=public,
            survivors=set(nodes),
            dropped=set(),
            threshold=3,
            ctx=CTX,
        )  # fmt: skip
        for node in nodes
    }
    total = unmask(masked, public=public, shares=shares, threshold=3, ctx=CTX)
    mean, weight = weighted_mean(Quantizer(scale_bits=bits, bound=bound).decode(total))
    assert weight == sum(n.values())
    reference = np.average([x[k] for k in nodes], axis=0, weights=[n[k] for k in nodes])
    assert np.max(np.abs(mean - reference)) <= len(nodes) / 2.0 ** (bits + 1) / weight
    with pytest.raises(SecAggError, match="count >= 1"):
        weighted_input(x[nodes[0]], weight=0)
    with pytest.raises(SecAggError, match="not a positive count"):
        weighted_mean(np.array([1.0, 0.0]))
