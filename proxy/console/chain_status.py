"""One record's place in the tamper-evident chain, checked from the stored pieces (shown on the exchange page).

This checks the record against its own hash, its link to the previous
record and the newest signed checkpoint, trusting the verifier keys recorded
in the database.  It is a quick look, not the proof: ``warden audit verify``
walks the whole chain and can check the signatures against a key kept
elsewhere (``--key``).
"""

from __future__ import annotations

import hmac
import time

from llm_warden.proxy.audit.chain import genesis_hash, leaf_hash, parse_checkpoint
from llm_warden.proxy.audit.reader import ChainProof
from llm_warden.proxy.audit.verify import keyring
from llm_warden.proxy.console.render import esc


def chain_findings(proof: ChainProof) -> list[tuple[str, str]]:
    """``(kind, text)`` lines, kind ``ok``, ``warn`` or ``error``."""
    out: list[tuple[str, str]] = []
    if hmac.compare_digest(leaf_hash(proof.prev_hash, proof.seq, proof.body), proof.hash):
        out.append(("ok", f"Record {proof.seq} matches its hash: its stored content was not altered."))
    else:
        out.append(("error", f"Record {proof.seq} does not match its hash: it was altered after it was written."))
    if proof.previous_hash is not None:
        linked = hmac.compare_digest(proof.previous_hash, proof.prev_hash)
    elif proof.seq == 1:
        linked = hmac.compare_digest(genesis_hash(proof.origin), proof.prev_hash)
    else:
        linked = None
    if linked is None:
        out.append(("warn", "The record before it was pruned (retention): the link is proven by the checkpoint that covered it."))
    elif linked:
        out.append(("ok", "It links to the record before it."))
    else:
        out.append(("error", "It does not link to the record before it: a record was removed or replaced."))
    if proof.checkpoint is None:
        out.append(("warn", "No signed checkpoint yet."))
        return out
    try:
        cp = parse_checkpoint(proof.checkpoint)
        ring = keyring(proof.keys)
    except ValueError as e:
        out.append(("error", f"The newest checkpoint cannot be read: {e}"))
        return out
    problem = cp.verify(ring)
    if problem is not None:
        out.append(("error", f"The newest checkpoint (record {cp.size}) does not verify: {problem}"))
    else:
        covers = "covers this record" if cp.size >= proof.seq else "does not cover this record yet (the next checkpoint will)"
        out.append(
            (
                "ok",
                f"The newest signed checkpoint, at record {cp.size} ({_utc(cp.timestamp)}), verifies with a key recorded in the database and {covers}.",
            )
        )
    return out


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def chain_html(proof: ChainProof | None) -> str:
    if proof is None:
        return '<p class="flash warn">The record\'s chain entry could not be read.</p>'
    items = "".join(
        f'<li class="{kind}">{"✔" if kind == "ok" else "⚠" if kind == "warn" else "✖"} {esc(text)}</li>'
        for kind, text in chain_findings(proof)
    )
    return (
        f'<ul class="chain">{items}</ul><p class="hint">Chain {esc(proof.origin)}. A quick look that trusts the keys recorded in the '
        "database; <code>warden audit verify --key …</code> walks the whole chain against a key kept elsewhere.</p>"
    )
