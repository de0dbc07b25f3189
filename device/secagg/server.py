"""The coordinator's side of secure aggregation: collect each stage, route, unmask the sum.

    server = SecAggServer(ctx, selected, size, FixedPoint())
    server.advertise(device, keys) ...; rosters = server.roster()            # stage 0 -> U1
    server.share(device, shares) ...; boxes = server.ciphertexts()           # stage 1 -> U2
    server.masked(device, masked) ...; lists = server.survivors()            # stage 2 -> U3
    server.unmask(device, unmask) ...; mean, weight = server.aggregate()     # stage 3 -> U4

Each `receive` method checks the message against the stage and raises SecAggError (one line,
naming the device) for a refusal; the round goes on with the devices that behaved. Each closing
method raises SecAggError when fewer than the threshold are left. The server sees only sealed
shares, masked vectors and the shares needed to remove the masks of the sum.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from edgeftl.device.secagg import crypto, masking, shamir
from edgeftl.device.secagg.errors import SecAggError
from edgeftl.device.secagg.fixedpoint import FixedPoint
from edgeftl.device.secagg.messages import (
    Advertise,
    Ciphertexts,
    Masked,
    Member,
    Params,
    Roster,
    Shares,
    Survivors,
    Unmask,
)
from edgeftl.device.secagg.prg import prg_uint32

MIN_THRESHOLD = 2
MAX_TRIES = 64  # t-subsets of shares tried when a reconstruction fails its check (tampered shares)


def threshold_for(devices: int) -> int:
    """t for a roster of `devices`: a majority, and at least 2."""
    return max(MIN_THRESHOLD, devices // 2 + 1)


class SecAggServer:
    """One round's secure aggregation, seen from the coordinator."""

    def __init__(self, ctx: bytes, selected: list[str], size: int, fixed: FixedPoint) -> None:
        if len(selected) > fixed.max_devices:
            raise SecAggError(f"too many devices: {len(selected)} selected, the encoding has room for "
                              f"{fixed.max_devices}")
        self.ctx, self.selected, self.size, self.fixed = ctx, set(selected), size, fixed
        self.keys: dict[str, Advertise] = {}  # U1
        self.sealed: dict[str, dict[str, bytes]] = {}  # U2: sender -> recipient -> ciphertext
        self.inputs: dict[str, np.ndarray] = {}  # U3
        self.unmasks: dict[str, Unmask] = {}  # U4
        self.params: Params | None = None
        self.stage = "advertise"

    # ---- stage 0 ----------------------------------------------------------------------------
    def advertise(self, device: str, keys: Advertise) -> None:
        self._expect("advertise", device, self.selected, self.keys)
        known = {k for a in self.keys.values() for k in (a.c_pk, a.s_pk)}
        if keys.c_pk == keys.s_pk or {keys.c_pk, keys.s_pk} & known:
            raise SecAggError(f"reused key: {device!r} advertised a public key already in this round")
        self.keys[device] = keys

    def roster(self) -> dict[str, Roster]:
        """Close stage 0: the same roster for every device that advertised (U1)."""
        self._close("advertise")
        self.params = Params(threshold_for(len(self.keys)), self.size, self.fixed)
        self._enough(self.keys, "advertised keys")
        roster = Roster(self.params, tuple(Member(d, self.keys[d]) for d in sorted(self.keys)))
        return dict.fromkeys(self.keys, roster)

    # ---- stage 1 ----------------------------------------------------------------------------
    def share(self, device: str, shares: Shares) -> None:
        self._expect("share", device, set(self.keys), self.sealed)
        expected = set(self.keys) - {device}
        if set(shares.sealed) != expected:
            missing, extra = sorted(expected - set(shares.sealed)), sorted(set(shares.sealed) - expected)
            raise SecAggError(f"bad shares: {device!r} sent shares missing {missing[:4]} or for others {extra[:4]}")
        self.sealed[device] = dict(shares.sealed)

    def ciphertexts(self) -> dict[str, Ciphertexts]:
        """Close stage 1: for each device that shared (U2), the shares the others sealed for it."""
        self._close("share")
        self._enough(self.sealed, "shared keys")
        return {v: Ciphertexts({u: self.sealed[u][v] for u in self.sealed if u != v}) for v in self.sealed}

    # ---- stage 2 ----------------------------------------------------------------------------
    def masked(self, device: str, masked: Masked) -> None:
        self._expect("masked", device, set(self.sealed), self.inputs)
        if masked.vector.shape != (self.size + 1,) or masked.vector.dtype != np.uint32:
            raise SecAggError(f"wrong size: {device!r} sent {masked.vector.shape} {masked.vector.dtype}, "
                              f"expected ({self.size + 1},) uint32")
        self.inputs[device] = masked.vector

    def survivors(self) -> dict[str, Survivors]:
        """Close stage 2: every device whose masked vector arrived (U3) learns who those are."""
        self._close("masked")
        self._enough(self.inputs, "masked vectors")
        survivors = Survivors(tuple(sorted(self.inputs)))
        return dict.fromkeys(self.inputs, survivors)

    # ---- stage 3 ----------------------------------------------------------------------------
    def unmask(self, device: str, unmask: Unmask) -> None:
        self._expect("unmask", device, set(self.inputs), self.unmasks)
        alive, dropped = set(self.inputs), set(self.sealed) - set(self.inputs)
        both = set(unmask.b_shares) & set(unmask.s_shares)
        if both:
            raise SecAggError(f"a device in two sets: {device!r} sent both secrets' shares of {sorted(both)[:4]}")
        if set(unmask.b_shares) != alive or set(unmask.s_shares) != dropped:
            raise SecAggError(f"bad unmask: {device!r} must send b shares of exactly the {len(alive)} survivors "
                              f"and s_sk shares of exactly the {len(dropped)} dropped devices")
        for share in (*unmask.b_shares.values(), *unmask.s_shares.values()):
            shamir.share_value(share)
        self.unmasks[device] = unmask

    def aggregate(self) -> tuple[np.ndarray, int]:
        """Close stage 3: remove every mask from the sum of U3's vectors and decode it.

        Returns:
            (the weighted mean of the survivors' clipped updates, float32; their total weight).
        """
        self._close("unmask")
        self._enough(self.unmasks, "unmask replies")
        total = np.zeros(self.size + 1, np.uint32)
        for vector in self.inputs.values():
            total += vector
        for u in self.inputs:
            total -= prg_uint32(self._recover(u, "b"), total.size)
        for v in set(self.sealed) - set(self.inputs):
            s_sk = self._recover(v, "s")
            for u in self.inputs:  # u added sign(u, v) * PRG(s_uv); s_uv = s_vu
                total -= masking.pair_mask(u, s_sk, v, self.keys[u].s_pk, self.ctx, total.size)
        return self.fixed.decode(total, len(self.inputs))

    def _recover(self, owner: str, which: str) -> bytes:
        """Reconstruct `owner`'s b or s_sk from the unmask replies and check it against what it advertised."""
        points = {d: i + 1 for i, d in enumerate(sorted(self.keys))}
        shares = {points[d]: shamir.share_value((u.b_shares if which == "b" else u.s_shares)[owner])
                  for d, u in self.unmasks.items()}
        t = self._params().threshold
        for chosen in itertools.islice(itertools.combinations(sorted(shares), t), MAX_TRIES):
            try:
                secret = shamir.reconstruct({x: shares[x] for x in chosen}, t)
            except SecAggError:
                continue
            if self._matches(owner, which, secret):
                return secret
        raise SecAggError(f"bad shares: no {t} of the {len(shares)} shares of {owner!r}'s {which} reconstruct "
                          "the advertised value")

    def _matches(self, owner: str, which: str, secret: bytes) -> bool:
        keys = self.keys[owner]
        if which == "b":
            return hashlib.sha256(secret).digest() == keys.b_commit
        return crypto.public_of(secret) == keys.s_pk

    # ---- checks -----------------------------------------------------------------------------
    def _expect(self, stage: str, device: str, allowed: set[str], taken: dict) -> None:
        if self.stage != stage:
            raise SecAggError(f"wrong stage: {stage} from {device!r} while the round is at {self.stage}")
        if device not in allowed:
            raise SecAggError(f"unknown device: {device!r} is not in this stage's set")
        if device in taken:
            raise SecAggError(f"second reply: {device!r} already sent its {stage}")

    def _close(self, stage: str) -> None:
        order = ("advertise", "share", "masked", "unmask", "done")
        if self.stage != stage:
            raise SecAggError(f"wrong stage: closing {stage} while the round is at {self.stage}")
        self.stage = order[order.index(stage) + 1]

    def _enough(self, taken: dict, what: str) -> None:
        t = self._params().threshold
        if len(taken) < t:
            self.stage = "failed"
            raise SecAggError(f"too few devices: {len(taken)} {what}, the threshold is {t}")

    def _params(self) -> Params:
        if self.params is None:
            raise SecAggError("wrong stage: no roster yet")
        return self.params
