"""Secure aggregation's protocol core: pure functions, no Flower.

A pairwise-masking protocol of the SecAgg+ family (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning"; Bell et al. 2020), here with every
site connected to every other (a hospital federation is small). The centre learns the sum of
the surviving sites' inputs and nothing else about any one input, as long as fewer than
``threshold`` sites collude with it. Every primitive is the ``cryptography`` package's:

* key agreement: X25519; key derivation: HKDF-SHA256, bound to the run, round and stage;
* mask expansion: ChaCha20 as a stream cipher over zeros (never ``random``/``numpy``);
* share transport: AES-256-GCM under the pairwise encryption key, the sender, recipient,
  run and round as associated data;
* commitments: SHA-256.

Shamir secret sharing (arithmetic over the prime field GF(2^521 - 1), coefficients from
:mod:`secrets`) splits each site's two per-round secrets among the round's sites: its
masking private key (recovered only for a site that dropped out, so the survivors' pairwise
masks with it can be removed) and its self-mask seed (recovered only for a survivor). An
honest site never reveals both for one site (:func:`unmask_shares`).

Inputs are fixed-point numbers in the ring Z_{2^64} (numpy ``uint64`` arithmetic wraps
exactly there): ``v`` is encoded as ``round(v * 2^f)`` two's complement. With n inputs each
of L2 norm (hence every coordinate) at most ``bound`` C, the decoded sum is exact up to
rounding, ``|error| <= n / 2^(f+1)`` per coordinate, and cannot wrap while
``n * (C * 2^f + 1/2) < 2^63`` (:func:`check_overflow`, checked before a round starts).

The stages of one round (the site's function, then the centre's):

1. advertise keys: :func:`new_round_keys` -> two X25519 public keys and a commitment to
   the self-mask seed, signed by the site (:func:`key_statement`);
2. share keys: :func:`share_keys` -> one AES-GCM ciphertext of shares per peer;
3. masked input: :func:`masked_input` -> ``q(x) + PRG(b) + sum_j ±PRG(s_ij)``, where a
   site's ``x`` is :func:`weighted_input`: ``[n_k Δ_k, n_k]`` with its own weight ``n_k``;
4. unmasking: :func:`unmask_shares` -> shares of dropped sites' masking keys and of
   survivors' seeds; the centre's :func:`unmask` removes the masks and returns the sum.

Examples
--------
>>> import numpy as np
>>> ctx = RoundContext(run_id="r1", round=1)
>>> sites = {1: new_round_keys(ctx), 2: new_round_keys(ctx), 3: new_round_keys(ctx)}
>>> public = {n: k.public for n, k in sites.items()}
>>> boxes = {n: share_keys(k, me=n, peers=public, threshold=2, ctx=ctx) for n, k in sites.items()}
>>> inbox = {n: {src: boxes[src][n] for src in sites} for n in sites}  # own share kept
>>> q = Quantizer(scale_bits=16, bound=1.0)
>>> x = {n: np.full(4, 0.25 * n) for n in sites}
>>> y = {n: masked_input(q.encode(x[n]), k, me=n, peers=public, ctx=ctx)
...      for n, k in sites.items() if n != 3}  # site 3 drops before sending its input
>>> shares = {n: unmask_shares(sites[n], me=n, inbox=inbox[n], peers=public, survivors={1, 2},
...                            dropped={3}, threshold=2, ctx=ctx) for n in (1, 2)}
>>> q.decode(unmask(y, public=public, shares=shares, threshold=2, ctx=ctx)).tolist()
[0.75, 0.75, 0.75, 0.75]
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedcare.common.errors import FedcareError

__all__ = [
    "SecAggError",
    "RING_BITS",
    "PRIME",
    "RoundContext",
    "Quantizer",
    "check_overflow",
    "split_secret",
    "combine_shares",
    "expand_mask",
    "PublicKeys",
    "RoundKeys",
    "new_round_keys",
    "key_statement",
    "share_keys",
    "open_shares",
    "masked_input",
    "unmask_shares",
    "unmask",
    "ShareKind",
    "SHARE_OF_KEY",
    "SHARE_OF_SEED",
    "pack_nodes",
    "unpack_nodes",
    "min_threshold",
    "weighted_input",
    "weighted_mean",
    "input_bound",
]

DOMAIN = b"fedcare-secagg-v1"
#: Inputs and masks live in Z_{2^RING_BITS} (numpy uint64 wraps there).
RING_BITS = 64
#: The Shamir field: the Mersenne prime 2^521 - 1 (a 256-bit secret is far below it).
PRIME = (1 << 521) - 1
_FIELD_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32
_NODE = struct.Struct(">Q")  # a Flower node id: an unsigned 64-bit integer
#: A share box: 12-byte nonce + AES-GCM(sender, recipient, two field elements) + 16-byte tag.
_BOX_BYTES = 12 + 2 * _NODE.size + 2 * _FIELD_BYTES + 16

ShareKind = str
#: An unmasking share of a dropped site's masking private key.
SHARE_OF_KEY: ShareKind = "key"
#: An unmasking share of a surviving site's self-mask seed.
SHARE_OF_SEED: ShareKind = "seed"


class SecAggError(FedcareError):
    """A secure-aggregation round cannot go on: too few sites, a malformed or inconsistent
    message, or settings that could overflow. The message says which and why."""


@dataclass(frozen=True)
class RoundContext:
    """What every key, mask and ciphertext of one round is bound to."""

    run_id: str
    round: int

    def info(self, label: str) -> bytes:
        """HKDF ``info`` / AEAD data for ``label`` in this round."""
        run = self.run_id.encode("utf-8")
        return b"|".join((DOMAIN, label.encode(), struct.pack(">I", len(run)) + run)) + (
            struct.pack(">q", self.round)
        )


# ------------------------------------------------------------------ quantisation


def check_overflow(*, n_sites: int, bound: float, scale_bits: int) -> None:
    """Refuse settings whose sum of ``n_sites`` inputs, each coordinate within ``bound``,
    could wrap around Z_{2^64} at scale ``2^scale_bits``.

    Raises
    ------
    SecAggError
        One line: the numbers, the limit and the fix.

    Examples
    --------
    >>> check_overflow(n_sites=10, bound=10.0, scale_bits=24)
    >>> check_overflow(n_sites=10, bound=1e12, scale_bits=24)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcare.common.secagg.SecAggError: secure aggregation of 10 sites ...
    """
    if n_sites < 1:
        raise SecAggError("secure aggregation needs at least one site")
    if not (math.isfinite(bound) and bound > 0):
        raise SecAggError(f"secure aggregation needs a finite update bound > 0, got {bound}")
    if not 1 <= scale_bits <= 52:
        raise SecAggError(f"secagg-scale-bits must be in 1..52, got {scale_bits}")
    worst = n_sites * (bound * 2.0**scale_bits + 0.5)
    if worst >= 2.0 ** (RING_BITS - 1):
        raise SecAggError(
            f"secure aggregation of {n_sites} sites with updates bounded by {bound:g} at "
            f"scale 2^{scale_bits} could overflow the 64-bit ring (sites x bound x scale = "
            f"{worst:.3g} >= 2^63); lower secagg-scale-bits or the update bound "
            "(max-update-norm, or hospital-dp-clip with hospital-level DP)"
        )


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding of float vectors in Z_{2^64} at scale ``2^scale_bits``.

    ``bound`` is the largest absolute coordinate an input may hold (an L2 bound bounds every
    coordinate): :meth:`encode` refuses more, so a sum of n inputs cannot wrap once
    :func:`check_overflow` accepted n.
    """

    scale_bits: int
    bound: float

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def max_error(self, n_sites: int) -> float:
        """The largest rounding error of a decoded sum of ``n_sites`` inputs, per coordinate."""
        return n_sites / (2.0 * self.scale)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float) as ring elements (uint64)."""
        v = np.asarray(values, np.float64).ravel()
        if not np.isfinite(v).all():
            raise SecAggError("an input to secure aggregation holds a NaN or an infinity")
        if v.size and float(np.max(np.abs(v))) > self.bound * (1 + 1e-12):
            raise SecAggError(
                f"an input coordinate {float(np.max(np.abs(v))):.6g} exceeds the bound "
                f"{self.bound:g} the round was sized for"
            )
        return np.rint(v * self.scale).astype(np.int64).view(np.uint64)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """A ring element (e.g. a sum of encoded inputs) back as float64."""
        return np.asarray(ring, np.uint64).view(np.int64).astype(np.float64) / self.scale


def weighted_input(delta: np.ndarray, *, weight: int) -> np.ndarray:
    """What a site masks: ``[weight * delta, weight]`` (float64), its update scaled by its
    own weight with the weight appended, so the centre's unmasked sum gives both
    ``Σ n_k Δ_k`` and ``Σ n_k`` and the weighted mean is their quotient
    (:func:`weighted_mean`). The weight is the site's own (its training-example count for
    FedAvg, 1 for a uniform mean), never one the centre sends.

    Examples
    --------
    >>> weighted_input(np.array([0.5, -1.0]), weight=3).tolist()
    [1.5, -3.0, 3.0]
    """
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise SecAggError(f"a site's secure-aggregation weight must be a count >= 1, got {weight}")
    v = np.asarray(delta, np.float64).ravel()
    return np.concatenate([weight * v, [float(weight)]])


def input_bound(*, weight: int, bound: float) -> float:
    """The largest coordinate of :func:`weighted_input` for an update of L2 norm <= ``bound``."""
    return weight * max(bound, 1.0)


def weighted_mean(total: np.ndarray) -> tuple[np.ndarray, float]:
    """``(Σ w_k Δ_k / Σ w_k, Σ w_k)`` from the decoded sum of :func:`weighted_input` vectors.

    Raises
    ------
    SecAggError
        The summed weight is not a positive finite number (a site masked something else).

    Examples
    --------
    >>> s = weighted_input(np.array([1.0]), weight=1) + weighted_input(np.array([4.0]), weight=3)
    >>> mean, weight = weighted_mean(s)
    >>> mean.tolist(), weight
    ([3.25], 4.0)
    """
    v = np.asarray(total, np.float64).ravel()
    if v.size < 1:
        raise SecAggError("the recovered sum holds no weight coordinate")
    weight = float(v[-1])
    if not (math.isfinite(weight) and weight >= 0.5):
        raise SecAggError(
            f"the recovered total weight {weight:.6g} is not a positive count: a site masked "
            "something else than its weighted update"
        )
    return v[:-1] / weight, weight


# ------------------------------------------------------------------ Shamir over GF(p)


def split_secret(secret: bytes, *, xs: Iterable[int], threshold: int) -> dict[int, bytes]:
    """Shamir shares of ``secret`` at the points ``xs`` (distinct, 1 <= x < p): any
    ``threshold`` of them give it back, fewer reveal nothing about it.

    The polynomial's coefficients are drawn with :func:`secrets.randbelow`.
    """
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise SecAggError("Shamir share points must be distinct and in 1..p-1")
    if not 1 <= threshold <= len(points):
        raise SecAggError(f"threshold {threshold} is not in 1..{len(points)} (the share count)")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise SecAggError("the secret is too large for the Shamir field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(_FIELD_BYTES, "big")
    return out


def _interpolate_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod p)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine_shares(
    shares: Mapping[int, bytes], *, threshold: int, length: int = _SECRET_BYTES
) -> bytes:
    """The secret of ``length`` bytes from ``threshold`` or more Shamir shares.

    Every share beyond the first ``threshold`` is checked to lie on their polynomial, so a
    wrong share among more than ``threshold`` is detected (not attributed).

    Raises
    ------
    SecAggError
        Fewer than ``threshold`` shares, a malformed share, or inconsistent shares.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) cannot give a secret shared {threshold}-of-n")
    points = []
    for x, raw in sorted(shares.items()):
        if len(raw) != _FIELD_BYTES or not 0 < x < PRIME:
            raise SecAggError("a Shamir share is malformed")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise SecAggError("a Shamir share is not a field element")
        points.append((x, y))
    base, rest = points[:threshold], points[threshold:]
    for x, y in rest:
        if _interpolate_at(base, x) != y:
            raise SecAggError("the Shamir shares are inconsistent: a site sent a wrong share")
    value = _interpolate_at(base, 0)
    if value >= 1 << (8 * length):
        raise SecAggError(
            "the Shamir shares do not give a secret of the expected size: a site sent a wrong share"
        )
    return value.to_bytes(length, "big")


# ------------------------------------------------------------------ keys and masks


def _hkdf(material: bytes, *, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def expand_mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform elements of Z_{2^64} from a 32-byte ``seed``: the ChaCha20 key
    stream (a zero nonce: every seed is derived for one round and one use)."""
    if len(seed) != 32:
        raise SecAggError("a mask seed must be 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _seed_commitment(seed: bytes, ctx: RoundContext) -> bytes:
    return hashlib.sha256(ctx.info("seed-commitment") + seed).digest()


@dataclass(frozen=True)
class PublicKeys:
    """What a site advertises: its encryption and masking X25519 public keys (raw) and a
    commitment (SHA-256) to its self-mask seed."""

    enc: bytes
    mask: bytes
    seed_commitment: bytes

    def check(self) -> None:
        if len(self.enc) != 32 or len(self.mask) != 32 or len(self.seed_commitment) != 32:
            raise SecAggError("advertised keys must be 32 bytes each")


@dataclass(frozen=True)
class RoundKeys:
    """A site's secrets for one round: two X25519 private keys (raw), the self-mask seed,
    and the seed's commitment. The secrets never leave the site, except as Shamir shares
    encrypted to its peers."""

    enc_private: bytes
    mask_private: bytes
    seed: bytes
    seed_commitment: bytes

    @property
    def public(self) -> PublicKeys:
        """What the site advertises in stage 1."""
        return PublicKeys(
            enc=_raw_public(X25519PrivateKey.from_private_bytes(self.enc_private)),
            mask=_raw_public(X25519PrivateKey.from_private_bytes(self.mask_private)),
            seed_commitment=self.seed_commitment,
        )


def new_round_keys(ctx: RoundContext) -> RoundKeys:
    """Fresh keys and seed for one round, from the OS's entropy."""
    seed = os.urandom(_SECRET_BYTES)
    return RoundKeys(
        enc_private=_raw_private(X25519PrivateKey.generate()),
        mask_private=_raw_private(X25519PrivateKey.generate()),
        seed=seed,
        seed_commitment=_seed_commitment(seed, ctx),
    )


def key_statement(ctx: RoundContext, node_id: int, public: PublicKeys) -> bytes:
    """The bytes a site signs with its site key to vouch for its advertised keys."""
    return b"|".join(
        (
            ctx.info("advertise"),
            _NODE.pack(node_id),
            public.enc,
            public.mask,
            public.seed_commitment,
        )
    )


def _pair_key(private: bytes, peer_public: bytes, *, ctx: RoundContext, label: str) -> bytes:
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as e:  # a low-order point gives an all-zero secret: refused by OpenSSL
        raise SecAggError(f"a peer's advertised key is not a usable X25519 key ({e})") from e
    return _hkdf(shared, info=ctx.info(label))


def _aad(ctx: RoundContext, src: int, dst: int) -> bytes:
    return ctx.info("shares") + _NODE.pack(src) + _NODE.pack(dst)


def _check_peers(peers: Mapping[int, PublicKeys], me: int, threshold: int) -> None:
    if me not in peers:
        raise SecAggError("this site's own keys are not among the round's advertised keys")
    if not 1 <= threshold <= len(peers):
        raise SecAggError(
            f"{len(peers)} site(s) advertised keys, fewer than the threshold {threshold}"
        )
    for node, public in peers.items():
        if not 0 < node < 1 << 64:
            raise SecAggError(f"node id {node} is not an unsigned 64-bit id")
        public.check()
    if len({p.mask for p in peers.values()}) != len(peers):
        raise SecAggError("two sites advertised the same masking key")


def share_keys(
    keys: RoundKeys,
    *,
    me: int,
    peers: Mapping[int, PublicKeys],
    threshold: int,
    ctx: RoundContext,
) -> dict[int, bytes]:
    """Stage 2 at site ``me``: its masking key and seed split ``threshold``-of-n among
    ``peers`` (node id -> advertised keys, ``me`` included), one AES-GCM ciphertext per
    other peer (its share for ``me`` itself is kept in the returned dict under ``me``, in
    the clear: it never leaves the site)."""
    _check_peers(peers, me, threshold)
    key_shares = split_secret(keys.mask_private, xs=peers, threshold=threshold)
    seed_shares = split_secret(keys.seed, xs=peers, threshold=threshold)
    out = {}
    for node in peers:
        plain = _NODE.pack(me) + _NODE.pack(node) + key_shares[node] + seed_shares[node]
        if node == me:
            out[node] = plain
            continue
        box = AESGCM(_pair_key(keys.enc_private, peers[node].enc, ctx=ctx, label="enc"))
        nonce = os.urandom(12)
        out[node] = nonce + box.encrypt(nonce, plain, _aad(ctx, me, node))
    return out


def open_shares(
    keys: RoundKeys,
    *,
    me: int,
    inbox: Mapping[int, bytes],
    peers: Mapping[int, PublicKeys],
    ctx: RoundContext,
) -> dict[int, tuple[bytes, bytes]]:
    """The shares (of masking key, of seed) each peer sent ``me``, decrypted and checked
    (sender, recipient, run and round must be the ones the ciphertext was made for)."""
    out = {}
    for src, blob in inbox.items():
        if src not in peers:
            raise SecAggError(f"shares from node {src}, which advertised no keys this round")
        if src == me:
            plain = blob
        else:
            if not isinstance(blob, bytes) or len(blob) != _BOX_BYTES:
                raise SecAggError(
                    f"the shares node {src} sent are {len(blob) if isinstance(blob, bytes) else 0}"
                    f" bytes, not the {_BOX_BYTES} of a share box: malformed; refused"
                )
            box = AESGCM(_pair_key(keys.enc_private, peers[src].enc, ctx=ctx, label="enc"))
            try:
                plain = box.decrypt(blob[:12], blob[12:], _aad(ctx, src, me))
            except (InvalidTag, ValueError):
                raise SecAggError(
                    f"the shares node {src} sent do not decrypt under its pairwise key: they "
                    "were altered, or are not for this site, run and round"
                ) from None
        if len(plain) != 16 + 2 * _FIELD_BYTES or plain[:16] != _NODE.pack(src) + _NODE.pack(me):
            raise SecAggError(f"the shares node {src} sent are malformed")
        out[src] = (plain[16 : 16 + _FIELD_BYTES], plain[16 + _FIELD_BYTES :])
    return out


def _pair_mask(
    private: bytes, me: int, peer: int, peer_public: bytes, size: int, ctx: RoundContext
) -> np.ndarray:
    """+PRG(s_ij) for the lower node id of the pair, -PRG(s_ij) for the higher."""
    mask = expand_mask(_pair_key(private, peer_public, ctx=ctx, label="mask"), size)
    return mask if me < peer else (np.uint64(0) - mask)


def _self_mask(seed: bytes, size: int, ctx: RoundContext) -> np.ndarray:
    return expand_mask(_hkdf(seed, info=ctx.info("self-mask")), size)


def masked_input(
    encoded: np.ndarray,
    keys: RoundKeys,
    *,
    me: int,
    peers: Mapping[int, PublicKeys],
    ctx: RoundContext,
) -> np.ndarray:
    """Stage 3 at site ``me``: its encoded input plus its self mask and its pairwise masks
    with every other site in ``peers`` (those whose shares reached the round)."""
    if me not in peers:
        raise SecAggError("this site is not among the sites whose shares reached the round")
    x = np.asarray(encoded, np.uint64).ravel()
    y = x + _self_mask(keys.seed, x.size, ctx)
    for node, public in sorted(peers.items()):
        if node != me:
            y += _pair_mask(keys.mask_private, me, node, public.mask, x.size, ctx)
    return y


def unmask_shares(
    keys: RoundKeys,
    *,
    me: int,
    inbox: Mapping[int, bytes],
    peers: Mapping[int, PublicKeys],
    survivors: set[int],
    dropped: set[int],
    threshold: int,
    ctx: RoundContext,
) -> dict[int, tuple[ShareKind, bytes]]:
    """Stage 4 at site ``me``: for each dropped site, its share of that site's masking key;
    for each survivor, its share of that survivor's seed; never both for one site.

    ``inbox`` is what stage 3 delivered (sender -> ciphertext, ``me`` -> own shares);
    survivors and dropped must split exactly the sites whose shares ``me`` received.

    Raises
    ------
    SecAggError
        Fewer survivors than ``threshold``, ``me`` not among them, or the two sets overlap or
        do not cover the senders: an honest site then reveals nothing.
    """
    if survivors & dropped:
        raise SecAggError(
            f"the centre lists node(s) {sorted(survivors & dropped)[:3]} as both survived and "
            "dropped: answering would reveal both secrets of a site; refused"
        )
    if survivors | dropped != set(inbox):
        raise SecAggError(
            "the centre's survivors and drop-outs are not exactly the sites whose shares this "
            "site received; refused"
        )
    if me not in survivors:
        raise SecAggError("the centre lists this site as dropped; it sends no shares")
    if len(survivors) < threshold:
        raise SecAggError(
            f"only {len(survivors)} site(s) survived, fewer than the threshold {threshold}: "
            "unmasking would weaken the protection; refused"
        )
    opened = open_shares(keys, me=me, inbox=inbox, peers=peers, ctx=ctx)
    out: dict[int, tuple[ShareKind, bytes]] = {}
    for src, (key_share, seed_share) in opened.items():
        out[src] = (SHARE_OF_KEY, key_share) if src in dropped else (SHARE_OF_SEED, seed_share)
    return out


def unmask(
    masked: Mapping[int, np.ndarray],
    *,
    public: Mapping[int, PublicKeys],
    shares: Mapping[int, Mapping[int, tuple[ShareKind, bytes]]],
    threshold: int,
    ctx: RoundContext,
    dropped: Iterable[int] = (),
) -> np.ndarray:
    """The centre's stage 4: the sum of the survivors' inputs (still encoded).

    Parameters
    ----------
    masked:
        Survivor -> its masked input.
    public:
        Every site of the round's stage 3 (survivors and drop-outs) -> its advertised keys.
    shares:
        Responding survivor -> (owner -> (kind, share)), from :func:`unmask_shares`.
    dropped:
        The sites of stage 3 that sent no masked input; by default every site of ``public``
        not in ``masked``.

    Raises
    ------
    SecAggError
        Fewer than ``threshold`` shares for a secret, a site's recovered key or seed not
        matching what it advertised (a wrong share), or shares of the wrong kind.
    """
    survivors = set(masked)
    lost = set(dropped) or (set(public) - survivors)
    if len(shares) < threshold:
        raise SecAggError(
            f"only {len(shares)} site(s) sent unmasking shares, fewer than the threshold "
            f"{threshold}: the sum cannot be recovered"
        )
    sizes = {np.asarray(v).size for v in masked.values()}
    if len(sizes) != 1:
        raise SecAggError("the masked inputs differ in length")
    size = sizes.pop()
    total = np.zeros(size, np.uint64)
    for value in masked.values():
        total += np.asarray(value, np.uint64).ravel()

    def gathered(owner: int, kind: ShareKind) -> dict[int, bytes]:
        out = {}
        for holder, theirs in shares.items():
            if owner in theirs:
                got_kind, share = theirs[owner]
                if got_kind != kind:
                    raise SecAggError(
                        f"node {holder} sent a {got_kind} share for node {owner}, whose {kind} "
                        "was asked for"
                    )
                out[holder] = share
        return out

    for node in sorted(survivors):
        seed = combine_shares(gathered(node, SHARE_OF_SEED), threshold=threshold)
        if _seed_commitment(seed, ctx) != public[node].seed_commitment:
            raise SecAggError(
                f"the self-mask seed recovered for node {node} does not match its commitment: "
                "a site sent a wrong share"
            )
        total -= _self_mask(seed, size, ctx)
    for node in sorted(lost):
        private = combine_shares(gathered(node, SHARE_OF_KEY), threshold=threshold)
        recovered = _raw_public(X25519PrivateKey.from_private_bytes(private))
        if recovered != public[node].mask:
            raise SecAggError(
                f"the masking key recovered for dropped node {node} does not match the key it "
                "advertised: a site sent a wrong share"
            )
        for survivor in sorted(survivors):
            # The survivor added ±PRG(s_ij) with the dropped site; s_ij = X25519(sk_j, pk_i)
            # equals X25519(sk_i, pk_j), so the recovered key gives the same mask.
            mask = expand_mask(
                _pair_key(private, public[survivor].mask, ctx=ctx, label="mask"), size
            )
            total -= mask if survivor < node else (np.uint64(0) - mask)
    return total


# ------------------------------------------------------------------ wire helpers


def pack_nodes(nodes: Iterable[int]) -> bytes:
    """Node ids (unsigned 64-bit: more than a Flower ConfigRecord's signed int holds) as
    bytes, 8 per id, in order."""
    return b"".join(_NODE.pack(n) for n in nodes)


def unpack_nodes(raw: object) -> list[int]:
    """The node ids :func:`pack_nodes` wrote; :class:`SecAggError` if malformed or repeated."""
    if not isinstance(raw, bytes) or len(raw) % _NODE.size:
        raise SecAggError("a list of node ids is malformed")
    nodes = [_NODE.unpack_from(raw, i)[0] for i in range(0, len(raw), _NODE.size)]
    if len(set(nodes)) != len(nodes):
        raise SecAggError("a list of node ids repeats a node")
    return nodes


def min_threshold(n_sites: int) -> int:
    """The least threshold a site accepts for a round of ``n_sites``: a strict majority, and
    at least 2 (a sum of one input is that input)."""
    return max(2, n_sites // 2 + 1)
