"""C2SP tlog proofs (https://c2sp.org/tlog-proof): one entry's inclusion with its checkpoint.

```
c2sp.org/tlog-proof@v1
extra <base64 of the leaf data>        (optional; here: the ledger record note)
index <leaf index>
<base64 inclusion proof hash, one per line, from the leaf's sibling up>

<the signed checkpoint note, verbatim>
```
"""

from __future__ import annotations

from dataclasses import dataclass

from lukhas.transparency.checkpoint import Checkpoint, open_checkpoint
from lukhas.transparency.errors import MalformedProof
from lukhas.transparency.merkle import HASH_SIZE, verify_inclusion
from lukhas.transparency.note import Verifier, b64decode, b64encode

HEADER = "c2sp.org/tlog-proof@v1"


@dataclass(frozen=True, slots=True)
class TlogProof:
    """An inclusion proof of leaf `index` against the signed `checkpoint` note."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None

    def text(self) -> str:
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {b64encode(self.extra)}")
        lines.append(f"index {self.index}")
        lines.extend(b64encode(h) for h in self.proof)
        return "\n".join(lines) + "\n\n" + self.checkpoint.decode()

    def verify(self, leaf: bytes, verifier: Verifier) -> Checkpoint:
        """Check the checkpoint's signature and that the leaf hash `leaf` is included.

        Raises:
            TransparencyError: the signature or the inclusion does not hold.
        """
        checkpoint = open_checkpoint(self.checkpoint, verifier)
        verify_inclusion(self.index, checkpoint.size, leaf, self.proof, checkpoint.root_hash)
        return checkpoint


def parse_tlog_proof(text: str) -> TlogProof:
    """Read a tlog-proof.

    Raises:
        MalformedProof: the text does not follow the format.
    """
    head, sep, checkpoint = text.partition("\n\n")
    if not sep or not checkpoint:
        raise MalformedProof("a tlog proof has a blank line before its checkpoint")
    lines = head.split("\n")
    if lines[0] != HEADER:
        raise MalformedProof(f"a tlog proof starts with {HEADER!r}")
    at, extra = 1, None
    if at < len(lines) and lines[at].startswith("extra "):
        try:
            extra = b64decode(lines[at][len("extra ") :])
        except ValueError:
            raise MalformedProof("the extra line is not base64") from None
        at += 1
    if at >= len(lines) or not lines[at].startswith("index "):
        raise MalformedProof("the index line is missing")
    digits = lines[at][len("index ") :]
    if not digits.isascii() or not digits.isdigit() or (digits != "0" and digits[0] == "0"):
        raise MalformedProof(f"index {digits[:30]!r} is not a decimal number")
    proof = []
    for line in lines[at + 1 :]:
        try:
            h = b64decode(line)
        except ValueError:
            raise MalformedProof("an inclusion proof line is not base64") from None
        if len(h) != HASH_SIZE:
            raise MalformedProof(f"an inclusion proof hash is {len(h)} bytes, not {HASH_SIZE}")
        proof.append(h)
    return TlogProof(int(digits), tuple(proof), checkpoint.encode(), extra)
